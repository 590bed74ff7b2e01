"""Encoding ``{"prompt", "completion"}`` rows and text lines into padded training batches.

Texts are space-separated tokens (the skill world's format, and any word-level tokenizer's);
labels are ``-100`` on ``<s>``, the prompt and padding, so losses cover completions only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

Encoded = tuple[list[int], list[int]]  # (input ids, labels)


def tokenize(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of ``text`` without special tokens (for the world's tokenizer: one id per word)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids: Sequence[int]) -> str:  # type: ignore[no-untyped-def]
    """Text of ``ids``: word-level vocabularies join every token with spaces (as written in the
    data); other tokenizers decode without special tokens. Callers cut at ``</s>`` first."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordLevel":
        return " ".join(tokenizer.convert_ids_to_tokens(list(ids)))
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def encode_examples(tokenizer, rows: Iterable[dict[str, str]]) -> list[Encoded]:  # type: ignore[no-untyped-def]
    """``<s> prompt completion </s>`` with labels on ``completion </s>`` only.

    Prompt and completion are tokenized apart, so the boundary is exact for any tokenizer.
    """
    out = []
    for row in rows:
        prompt = [tokenizer.bos_token_id, *tokenize(tokenizer, row["prompt"])]
        completion = [*tokenize(tokenizer, row["completion"]), tokenizer.eos_token_id]
        out.append((prompt + completion, [-100] * len(prompt) + completion))
    return out


def encode_text(tokenizer, lines: Iterable[str]) -> list[Encoded]:  # type: ignore[no-untyped-def]
    """Plain language-model lines: loss on every token after ``<s>``."""
    out = []
    for line in lines:
        ids = [tokenizer.bos_token_id, *tokenize(tokenizer, line), tokenizer.eos_token_id]
        out.append((ids, [-100, *ids[1:]]))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` of shape ``(B, T)``."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, (ids, labs) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
