"""Pure tensor maths of the LoRA bank (no transformers, no modules).

A bank of k LoRAs on one linear layer stacks their factors (DESIGN.md, "one bank, many ways to
weight it")::

    A = [s_1 A_1; …; s_k A_k]   (R × in),  R = Σ r_i
    B = [B_1 … B_k]             (out × R)
    Δy = ((x Aᵀ) ⊙ expand(w)) Bᵀ

where ``expand`` repeats LoRA i's weight over its r_i ranks. ``w`` is ``(k,)`` (one weight per
LoRA), ``(batch, k)`` (per row) or ``(batch, seq, k)`` (per token). With ``w = e_i`` this is
exactly LoRA i; with any ``w`` it equals the ``cat`` merge ``Σ w_i s_i B_i A_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stack_factors(
    factors: Sequence[tuple[Tensor, Tensor, float] | None], in_features: int, out_features: int
) -> tuple[Tensor, Tensor, list[int]]:
    """Stack ``(A_i, B_i, s_i)`` into ``A (R, in)``, ``B (out, R)``; ``None`` = LoRA i is absent.

    The scale is folded into ``A``. Returns the ranks ``r_i`` (0 for absent LoRAs).
    """
    a_blocks: list[Tensor] = []
    b_blocks: list[Tensor] = []
    ranks: list[int] = []
    for item in factors:
        if item is None:
            ranks.append(0)
            continue
        a, b, scale = item
        a_blocks.append(a.float() * scale)  # (r_i, in)
        b_blocks.append(b.float())  # (out, r_i)
        ranks.append(int(a.shape[0]))
    if not a_blocks:
        return torch.zeros(0, in_features), torch.zeros(out_features, 0), ranks
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 1), ranks  # (R, in), (out, R)


def rank_index(ranks: Sequence[int]) -> Tensor:
    """``(R,)`` index of the LoRA that owns each stacked rank: ``[0]*r_0 + [1]*r_1 + …``."""
    return torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks, dtype=torch.long))


def check_weights(weights: Tensor, k: int) -> Tensor:
    """Validate bank weights: ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)``, finite, float."""
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float32)
    if not weights.is_floating_point():
        weights = weights.float()
    if weights.ndim not in (1, 2, 3) or weights.shape[-1] != k:
        raise ValueError(
            f"bank weights must have shape (k,), (batch, k) or (batch, seq, k) with k={k} "
            f"LoRAs, got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"bank weights contain NaN or inf: {weights}")
    return weights


def expand_weights(weights: Tensor, index: Tensor, x_shape: torch.Size, where: str = "") -> Tensor:
    """Broadcastable per-rank weights for an input of shape ``x_shape = (..., in)``.

    ``(k,)`` → ``(R,)``; ``(b, k)`` → ``(b, 1, …, 1, R)``; ``(b, s, k)`` → ``(b, s, R)``.
    """
    w = weights.index_select(-1, index)  # (..., R)
    if weights.ndim == 1:
        return w
    lead = tuple(x_shape[:-1])
    at = f" at {where}" if where else ""
    if weights.ndim == 2:
        if not lead or lead[0] != weights.shape[0]:
            raise ValueError(
                f"per-row bank weights have batch {weights.shape[0]} but the layer input{at} is "
                f"{tuple(x_shape)}; give one row per sequence (repeat rows for "
                "num_return_sequences or beams)"
            )
        return w.view(weights.shape[0], *([1] * (len(lead) - 1)), w.shape[-1])
    if lead != tuple(weights.shape[:2]):
        raise ValueError(
            f"per-token bank weights have (batch, seq) = {tuple(weights.shape[:2])} but the layer "
            f"input{at} is {tuple(x_shape)}. Static per-token weights fit one forward pass of that "
            "length; during generation use per-row weights or a weight source that computes "
            "weights per step (LoRA-Flow gates, routers)."
        )
    return w


def spread_weights(weights: Tensor, owner: Tensor) -> Tensor:
    """Per-LoRA weights → per-rank coefficients ``c[b, t, j] = w[b, t, owner[j]]`` (0 where owner < 0).

    ``weights`` is ``(k,)``, ``(B, k)`` or ``(B, 1|T, k)``; ``owner`` is ``(R,)`` (one stack shared by
    every row: the bank's own ranks) or ``(B, R)`` (a serving plan: row b's part owning rank j,
    -1 on padding). Returns ``(1|B, 1|T, R)``.
    """
    if weights.ndim == 1:
        weights = weights.view(1, 1, -1)  # (1, 1, k)
    elif weights.ndim == 2:
        weights = weights.unsqueeze(1)  # (B, 1, k)
    valid = (owner >= 0).to(weights.dtype)
    index = owner.clamp(min=0)
    if owner.ndim == 1:
        return weights.index_select(-1, index) * valid  # (B, 1|T, R)
    index = index.unsqueeze(1).expand(-1, weights.shape[1], -1)  # (B, 1|T, R)
    return weights.expand(index.shape[0], -1, -1).gather(-1, index) * valid.unsqueeze(1)  # (B, 1|T, R)


def token_rows(x: Tensor, batch: int, steps: int, where: str = "") -> Tensor:
    """``x`` as ``(B, T', in)`` rows for coefficients of batch ``batch`` and ``steps`` (1 or T) tokens.

    A layer input is ``(B, T, in)`` for most layers; OPT's ``fc1``/``fc2`` and Qwen2-MoE's shared
    expert see the tokens flattened row-major to ``(B·T, in)``, so token ``n`` belongs to row
    ``n // T`` and the view ``(B, T, in)`` restores it (the token→row index is the view). A
    coefficient batch of 1 broadcasts over any input.
    """
    at = f" at {where}" if where else ""
    if batch == 1 and steps == 1:
        return x.reshape(1, -1, x.shape[-1])  # (1, N, in)
    if x.ndim == 3 and x.shape[0] == batch and steps in (1, x.shape[1]):
        return x
    tokens = x.shape[:-1].numel()
    if x.ndim == 2 and tokens % batch == 0 and steps in (1, tokens // batch):
        return x.view(batch, tokens // batch, x.shape[-1])  # (B, T, in): token n is row n // T
    if steps == 1:
        raise ValueError(
            f"per-row bank weights have batch {batch} but the layer input{at} is {tuple(x.shape)}; "
            "give one row per sequence (repeat rows for num_return_sequences or beams)"
        )
    raise ValueError(
        f"per-token bank weights have (batch, seq) = ({batch}, {steps}) but the layer input{at} is "
        f"{tuple(x.shape)}. Static per-token weights fit one forward pass of that length; during "
        "generation use per-row weights or a weight source that computes weights per step "
        "(LoRA-Flow gates, routers)."
    )


def bank_delta(x: Tensor, A: Tensor, B: Tensor, w: Tensor) -> Tensor:
    """``Δy = ((x Aᵀ) ⊙ w) Bᵀ`` for stacked factors ``A (R, in)``, ``B (out, R)``.

    ``x`` is ``(..., in)`` and ``w`` broadcasts against ``(..., R)`` (see :func:`expand_weights`).
    """
    h = x @ A.T  # (..., R)
    return (h * w) @ B.T  # (..., out)


def gathered_delta(x: Tensor, A_rows: Tensor, B_rows: Tensor, coef: Tensor) -> Tensor:
    """Per-row LoRAs (Punica's BGMV, S-LoRA): ``Δy_b = ((x_b A_bᵀ) ⊙ c_b) B_b`` for each row ``b``.

    ``x`` is ``(B, T, in)``; ``A_rows (B, R, in)`` and ``B_rows (B, R, out)`` hold the ranks each row
    uses (gathered from a table, zero rows as padding); ``coef`` is ``(B, 1, R)`` or ``(B, T, R)``.
    Cost follows the ranks a row uses, not every adapter loaded.
    """
    h = torch.bmm(x, A_rows.transpose(1, 2))  # (B, T, R)
    return torch.bmm(h * coef, B_rows)  # (B, T, out)


def table_delta(x: Tensor, A_used: Tensor, B_used: Tensor, coef: Tensor) -> Tensor:
    """Shared ranks for the whole batch: ``Δy = ((x A_Uᵀ) ⊙ c) B_U`` with one matmul pair.

    ``A_used (U, in)`` and ``B_used (U, out)`` are the U table rows any row of the batch uses;
    ``coef (B, 1, U)`` or ``(B, T, U)`` is zero where a row does not use a rank. Cheaper than
    :func:`gathered_delta` when the batch shares few adapters (U small).
    """
    h = x @ A_used.T  # (B, T, U)
    return (h * coef) @ B_used  # (B, T, out)
