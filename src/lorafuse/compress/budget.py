"""Byte budgets and how Delta-CoMe splits singular vectors into precision segments.

A budget is a ratio of the fp16 delta's size: ``1/16`` of ``2·out·in`` bytes is one bit per
weight. Delta-CoMe (Ping et al., 2024, arXiv 2406.08903) keeps ``ΔW = U diag(S) Vᵀ``'s singular
vectors in segments of falling precision; its default schedule is 8 bits for the first 2
vectors, 3 bits for the next 32 and 2 bits for as many as then fit (written ``8:2,3:32,2:*``).
Every byte is counted: ``S`` (fp32), codes, zero points, fp16 scales and act-order permutations
of both factors (:func:`factors_nbytes`). ``auto`` instead chooses each vector's width (0–8) to
minimise the estimated error ``Σ_i σ_i² ε(b_i)`` under the budget, where ``ε(b)`` is the measured
relative squared error of quantizing the leading singular vectors at ``b`` bits (``ε(0) = 1``:
dropped): the allocations of a Lagrangian relaxation ``min σ_i² ε(b) + λ·bytes(b)`` over a grid
of ``λ``, each trimmed to fit the exact size, the best one kept. Pure tensor maths.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from lorafuse.compress.quantize import quant_nbytes, rtn_quantize
from lorafuse.errors import BudgetError

Schedule = list[tuple[int, int | None]]  # [(bits, vectors or None = as many as fit)]
PAPER_SCHEDULE = "8:2,3:32,2:*"


def parse_budget(text: str | float) -> float:
    """``"1/16"``, ``"0.05"`` or a float → a ratio in ``(0, 1]`` of the fp16 delta's bytes."""
    try:
        ratio = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise BudgetError(f"budget {text!r} is not a ratio such as 1/16 or 0.05") from None
    if not 0 < ratio <= 1:
        raise BudgetError(f"budget {text!r} must be a ratio in (0, 1] of the fp16 delta's size")
    return ratio


def budget_nbytes(out: int, in_: int, ratio: float) -> int:
    """Bytes allowed for one ``(out, in)`` module: ``⌊ratio · 2 · out · in⌋``."""
    return math.floor(ratio * 2 * out * in_ + 1e-9)


def parse_schedule(text: str) -> Schedule:
    """``"8:2,3:32,2:*"`` → ``[(8, 2), (3, 32), (2, None)]`` (``paper`` is that schedule)."""
    text = PAPER_SCHEDULE if text == "paper" else text
    schedule: Schedule = []
    try:
        for part in text.split(","):
            bits, _, count = part.strip().partition(":")
            schedule.append((int(bits), None if count.strip() in ("*", "") else int(count)))
    except ValueError:
        raise BudgetError(
            f"schedule {text!r}: write it as BITS:COUNT,... with * for 'as many as fit'"
        ) from None
    if any(not 1 <= b <= 8 or (c is not None and c < 0) for b, c in schedule):
        raise BudgetError(f"schedule {text!r}: bit widths must be 1..8 and counts ≥ 0")
    return schedule


def factors_nbytes(
    out: int, in_: int, segments: list[tuple[int, int]], group_size: int = 128, act_order: bool = True
) -> int:
    """Exact bytes of quantized factors with ``segments`` ``[(vectors, bits)]``."""
    total = 0
    for i, (n, bits) in enumerate(segments):
        if n == 0:
            continue
        total += 4 * n  # S
        shared_perm = act_order and i > 0  # Vᵀ segments share one act-order permutation
        total += quant_nbytes(n, in_, bits, min(group_size, in_), "float16", act_order) - (
            in_ * (2 if in_ <= 32767 else 4) if shared_perm else 0
        )  # Vᵀ rows
        total += quant_nbytes(out, n, bits, min(group_size, n), "float16", act_order)  # U columns
    return total


def _too_small(path: str, out: int, in_: int, budget: int, one: int) -> BudgetError:
    return BudgetError(
        f"{path}: a budget of {budget} bytes for a ({out}, {in_}) delta cannot hold even one singular "
        f"vector ({one} bytes at the cheapest width of the schedule, with its scales and zero points); "
        "raise --budget"
    )


def fit_schedule(
    schedule: Schedule,
    out: int,
    in_: int,
    budget: int,
    *,
    max_rank: int,
    group_size: int = 128,
    act_order: bool = True,
    path: str = "module",
) -> list[tuple[int, int]]:
    """Fill the schedule's segments in order, each with as many vectors as fit (≤ its count)."""
    segments: list[tuple[int, int]] = []
    used = 0
    for bits, count in schedule:
        cap = max_rank - used if count is None else min(count, max_rank - used)
        lo, hi = 0, cap  # largest n in [0, cap] that fits (cost grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if factors_nbytes(out, in_, [*segments, (mid, bits)], group_size, act_order) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            segments.append((lo, bits))
            used += lo
    if not segments:
        one = min(factors_nbytes(out, in_, [(1, b)], group_size, act_order) for b, _ in schedule)
        raise _too_small(path, out, in_, budget, one)
    return segments


def vector_errors(U: Tensor, Vh: Tensor, group_size: int = 128, sample: int = 16) -> dict[int, float]:
    """``ε(b)``: mean relative squared RTN error of the leading ``u_i`` and ``v_i`` at ``b`` bits."""
    m = min(sample, Vh.shape[0])
    eps = {0: 1.0}
    for bits in range(1, 9):
        err = 0.0
        for M in (Vh[:m], U[:, :m].T):  # (m, in), (m, out): unit rows
            q = rtn_quantize(M, bits, group_size).dequantize()
            err += float(((q - M) ** 2).sum() / (M**2).sum())
        eps[bits] = min(err, 1.0)
    return eps


def auto_allocate(
    S: Tensor,
    eps: dict[int, float],
    out: int,
    in_: int,
    budget: int,
    *,
    group_size: int = 128,
    act_order: bool = True,
    path: str = "module",
) -> tuple[list[tuple[int, int]], float]:
    """Widths minimising ``Σ σ_i² ε(b_i)`` under ``budget``; returns segments and relative error."""
    s2 = S.double() ** 2  # (r,)
    widths = [b for b in eps if b > 0]
    per_vec = {  # bytes of one more vector in a long segment (scales amortised)
        b: 4 + (in_ * b + -(-in_ // group_size) * (16 + b) + out * b + out * (16 + b) / group_size) / 8
        for b in widths
    }
    cost = torch.tensor([0.0] + [per_vec[b] for b in widths], dtype=torch.float64)  # (W+1,)
    err = torch.tensor([eps[0]] + [eps[b] for b in widths], dtype=torch.float64)
    choices = torch.tensor([0, *widths])

    def allocate(lam: float) -> list[tuple[int, int]]:
        total = s2[:, None] * err[None, :] + lam * cost[None, :]  # (r, W+1)
        bits = choices[total.argmin(dim=1)]
        bits = torch.cummin(bits, dim=0).values  # segments of falling precision
        segments: list[tuple[int, int]] = []
        for b in bits.tolist():
            if b == 0:
                break
            if segments and segments[-1][1] == b:
                segments[-1] = (segments[-1][0] + 1, b)
            else:
                segments.append((1, b))
        return segments

    def estimate(segs: list[tuple[int, int]]) -> float:
        kept = torch.tensor([eps[b] for n, b in segs for _ in range(n)], dtype=torch.float64)
        return float(s2[: kept.numel()] @ kept) + float(s2[kept.numel() :].sum())

    # The allocation is a step function of λ and the exact bytes (segment overheads included) are
    # not monotone in it: scan a log grid of λ and keep the best allocation that fits.
    unit = float(s2.max()) / max(per_vec.values()) if float(s2.max()) > 0 else 1.0
    best: list[tuple[int, int]] = []
    best_err = math.inf
    seen: set[tuple[tuple[int, int], ...]] = set()
    for log_lam in torch.linspace(-40.0, 10.0, 401).tolist():
        proposal = allocate(unit * math.exp(log_lam))
        if not proposal or tuple(proposal) in seen:
            continue
        seen.add(tuple(proposal))
        try:  # trimmed to fit, segment by segment (small segments cost more than λ assumed)
            segs = fit_schedule(
                [(b, n) for n, b in proposal],
                out,
                in_,
                budget,
                max_rank=S.numel(),
                group_size=group_size,
                act_order=act_order,
                path=path,
            )
        except BudgetError:
            continue
        err_ = estimate(segs)
        if err_ < best_err:
            best, best_err = segs, err_
    for bits in widths:  # single-width allocations: a fallback where λ skips over them
        try:
            segs = fit_schedule(
                [(bits, None)], out, in_, budget, max_rank=S.numel(), group_size=group_size,
                act_order=act_order, path=path,
            )  # fmt: skip
        except BudgetError:
            continue
        if estimate(segs) < best_err:
            best, best_err = segs, estimate(segs)
    if not best:
        one = min(factors_nbytes(out, in_, [(1, b)], group_size, act_order) for b in widths)
        raise _too_small(path, out, in_, budget, one)
    return best, best_err / max(float(s2.sum()), 1e-300)
