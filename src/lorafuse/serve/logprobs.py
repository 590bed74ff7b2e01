"""Log-probabilities of tokens, as the OpenAI API reports them.

The maths is :func:`token_logprobs`, a pure function over tensors: log-softmax in float32 of the
logits the sampler sees (after the ``min_tokens`` ban on end-of-sequence, before temperature and
top-p, as vLLM and OpenAI report by default), the chosen token's log-probability and the ``k``
most likely tokens. The rest turns those numbers into the two response formats: the legacy
completions object (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and chat's
``logprobs.content`` list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` most likely tokens at its position (best first)."""

    token: int
    logprob: float | None  # None: the first prompt token
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``logits`` (N, V), ``chosen`` (N,) token ids, ``k`` ≥ 0 → the chosen tokens' log-probabilities
    (N,), and the top-``k`` log-probabilities (N, k) sorted descending with their ids (N, k)."""
    if logits.dim() != 2 or chosen.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, V) and chosen (N,); got {tuple(logits.shape)}, {tuple(chosen.shape)}"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    picked = logp.gather(1, chosen.long().view(-1, 1).to(logp.device)).squeeze(1)  # (N,)
    values, ids = logp.topk(min(k, logp.shape[1]), dim=-1, sorted=True)  # (N, k)
    return picked, values, ids


def records(logits: Tensor, chosen: Tensor, k: int, chunk: int = 512) -> list[TokenLogprob]:
    """:func:`token_logprobs` as one :class:`TokenLogprob` per row, ``chunk`` rows at a time (a
    prompt's float32 log-softmax is ``(rows, vocab)``)."""
    out = []
    for start in range(0, logits.shape[0], chunk):
        rows, picks = logits[start : start + chunk], chosen[start : start + chunk]
        picked, values, ids = token_logprobs(rows, picks, k)
        out.extend(
            TokenLogprob(int(t), float(p), tuple(zip(i, v, strict=True)))
            for t, p, i, v in zip(picks.tolist(), picked.tolist(), ids.tolist(), values.tolist(), strict=True)
        )
    return out


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_text: Callable[[int, int], str], k: int, start: int = 0
) -> dict:
    """The legacy completions ``logprobs`` object. An entry whose ``logprob`` is ``None`` (the
    first prompt token's, which nothing predicts) has ``null`` log-probabilities. Each
    ``top_logprobs`` entry holds the ``k`` most likely tokens and, as OpenAI and vLLM do, the chosen
    token when it is not among them; ``text_offset`` counts characters from ``start``.
    ``token_text(token, i)`` is a token's text at entry ``i`` (a word-level vocabulary puts a space
    before every word but a segment's first)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start
    for i, entry in enumerate(entries):
        text = token_text(entry.token, i)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(entry.logprob)
        if entry.logprob is None:
            tops.append(None)
            continue
        best = {token_text(t, i): v for t, v in entry.top[:k]}
        best.setdefault(text, entry.logprob)
        tops.append(best)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int, int], str], k: int) -> dict:
    """Chat's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}`` with
    exactly the ``k`` most likely tokens in each ``top_logprobs``."""

    def one(token: int, value: float, i: int) -> dict:
        text = token_text(token, i)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, e in enumerate(entries):
        tops = [one(t, v, i) for t, v in e.top[:k]]
        content.append({**one(e.token, float(e.logprob or 0.0), i), "top_logprobs": tops})
    return {"content": content}
