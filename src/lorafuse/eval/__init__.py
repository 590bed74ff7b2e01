"""Evaluation: batched greedy generation with the KV cache, exact match, response-token loss."""

from lorafuse.eval.generate import evaluate, generate, response_loss
from lorafuse.eval.metrics import exact_match, extract_answer

__all__ = ["evaluate", "exact_match", "extract_answer", "generate", "response_loss"]
