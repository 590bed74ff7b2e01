"""Batched greedy generation (left padding, KV cache) and scoring on ``{"prompt", ...}`` rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafuse._checks import InvalidValueError, check_number
from lorafuse._data import collate, decode, encode_examples, encode_prompt
from lorafuse.eval.metrics import exact_match

log = logging.getLogger("lorafuse.notices")  # shown to CLI users on stderr (lorafuse.cli.main)


def context_length(model: nn.Module) -> int | None:
    """Tokens the model attends over at most (``config.max_position_embeddings``), if it says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def cap_new_tokens(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_new_tokens`` cut so that the prompt and the answer fit the model's context.

    Asking for more than fits (``--max-new-tokens 100000``) is not an error: the cap is logged
    once (one line on stderr unless logging is configured) and generation stops at the context.
    A prompt that leaves no room at all is an :class:`~lorafuse._checks.InvalidValueError`.
    """
    check_number(max_new_tokens, "max_new_tokens", integer=True, low=1)
    context = context_length(model)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    room = context - prompt_tokens
    if room < 1:
        raise InvalidValueError(
            f"a prompt of {prompt_tokens} tokens leaves no room to generate in the model's context of "
            f"{context} tokens; shorten the prompt"
        )
    log.warning(
        "note: max_new_tokens %d capped at %d (the model's context of %d tokens minus a prompt of %d)",
        max_new_tokens,
        room,
        context,
        prompt_tokens,
    )
    return room


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,  # type: ignore[no-untyped-def]
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    progress: bool = False,
    min_new_tokens: int = 0,
    chat: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts`` (``<s>`` prepended, or each rendered as a user turn with
    the chat template when ``chat``), cut at ``</s>`` (which is banned before ``min_new_tokens``
    tokens).

    Prompts are tokenized and completions decoded by :func:`lorafuse._data.tokenize` /
    :func:`~lorafuse._data.decode`, the same as for training (word level: one id per word).
    ``max_new_tokens`` is capped (:func:`cap_new_tokens`) so that the longest prompt and its
    answer fit the model's context; the same cap applies to every batch.
    """
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if encoded:
        max_new_tokens = cap_new_tokens(model, max(len(c) for c in encoded), max_new_tokens)
        min_new_tokens = min(min_new_tokens, max_new_tokens)
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = encoded[start : start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, width - len(c) :] = torch.tensor(c)
            mask[i, width - len(c) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            outputs.append(decode(tokenizer, row))
    return outputs


def evaluate(
    model: nn.Module,
    tokenizer,  # type: ignore[no-untyped-def]
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Exact match (in %) of greedy generations on ``rows``; with rows that carry a
    ``final_answer`` (the faithful family) also ``final_answer_match``: the result after ``####``
    alone, MGSM's metric."""
    if max_new_tokens is None:
        max_new_tokens = max(len(r["completion"].split()) for r in rows) + 4
    generated = generate(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    pairs = list(zip(generated, rows, strict=True))
    hits = sum(exact_match(g, r["answer"], r["completion"]) for g, r in pairs)
    result = {"exact_match": 100.0 * hits / len(rows), "n": len(rows)}
    if all("final_answer" in r for r in rows):
        final = sum(exact_match(g, r["final_answer"], r["completion"]) for g, r in pairs)
        result["final_answer_match"] = 100.0 * final / len(rows)
    return result


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, rows: Sequence[dict[str, str]], batch_size: int = 64) -> float:  # type: ignore[no-untyped-def]
    """Mean cross-entropy per completion token (``</s>`` included), over all rows."""
    encoded = encode_examples(tokenizer, rows)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(encoded[start : start + batch_size], tokenizer.pad_token_id).items()
        }
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((labels != -100).sum())
    return total / max(count, 1)
