"""LoRA-Flow's token-level analysis: mean gate weight of each LoRA on answer tokens, by kind.

The paper (arXiv 2402.11455, its analysis of the fusion gates) shows that the gates give the
language LoRA more weight on tokens of the language and the task LoRA more on the computation.
Here, over teacher-forced dev examples, each answer token is one of:

- ``language words``: an alphabetic token (a word of the language, or of English);
- ``digits and operators``: ``0``–``9``, ``+``, ``-``, ``=``;

(punctuation, ``:``, ``####`` and ``</s>`` are left out). The weight of a token is the gate's
output at the position *before* it, the one used when the model produces it (as in decoding).
Result: ``{kind: (layers, k) mean weights}`` and the token counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorafuse._data import collate, encode_examples
from lorafuse.fusion.flow import LoRAFlow

COMPUTATION = {str(d) for d in range(10)} | {"+", "-", "="}
KINDS = ("language words", "digits and operators")


def token_kind(token: str) -> str | None:
    """``language words``, ``digits and operators`` or None (left out)."""
    if token in COMPUTATION:
        return KINDS[1]
    if token.isalpha():
        return KINDS[0]
    return None


@torch.no_grad()
def token_gate_means(
    banks: dict[str, Any], rows: list[dict[str, str]], model: torch.nn.Module, tokenizer: Any
) -> dict[str, Any]:
    """Mean LoRA-Flow weights per layer on the answer tokens of ``rows``, by token kind."""
    source = getattr(next(iter(banks.values())).source, "rule", None)
    if not isinstance(source, LoRAFlow):
        raise TypeError("token_gate_means needs a LoRA-Flow fusion attached")
    batch = collate(encode_examples(tokenizer, rows), tokenizer.pad_token_id)
    source.record = []
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        record = list(source.record)
    finally:
        source.record = None
    ids, labels = batch["input_ids"], batch["labels"]  # (B, T)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    masks = {kind: torch.zeros(ids.shape, dtype=torch.bool) for kind in KINDS}  # (B, T), by weight position
    for b, row_tokens in enumerate(tokens):
        for t in range(ids.shape[1] - 1):
            kind = token_kind(row_tokens[t + 1]) if labels[b, t + 1] != -100 else None
            if kind is not None:
                masks[kind][b, t] = True
    by_layer: dict[int, Tensor] = dict(record)  # layer → (B, T, k)
    means = {}
    for kind, mask in masks.items():
        rows_out = [by_layer[layer][mask].mean(0) for layer in sorted(by_layer)] if mask.any() else []
        means[kind] = [[round(float(v), 4) for v in w] for w in rows_out]
    return {"mean_weights": means, "tokens": {kind: int(mask.sum()) for kind, mask in masks.items()}}
