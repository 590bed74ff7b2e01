"""``low-rank``: fp16 truncated SVD at the byte budget, the baseline of Delta-CoMe (arXiv 2406.08903).

``ΔŴ = U_k diag(S_k) V_kᵀ`` (Eckart–Young optimum of rank ``k``), stored as ``B = U_k diag(S_k)``
``(out, k)`` and ``A = V_kᵀ`` ``(k, in)`` in fp16, with ``k = ⌊budget / (2 (out + in))⌋``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafuse.compress.registry import CompressMethod, NoParams, register
from lorafuse.compress.types import HalfFactors
from lorafuse.errors import BudgetError


def compress_low_rank(
    delta: Tensor, hessian: Tensor | None, budget: int, params: NoParams, path: str
) -> HalfFactors:
    out, in_ = delta.shape
    rank_within(budget, out, in_, path)  # refuse before the SVD
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, r), (r,), (r, in)
    return truncate(U, S, Vh, budget, path)


def rank_within(budget: int, out: int, in_: int, path: str) -> int:
    """``k = ⌊budget / 2(out + in)⌋`` (at most ``min(out, in)``); at least 1, or a BudgetError."""
    k = min(budget // (2 * (out + in_)), min(out, in_))
    if k < 1:
        raise BudgetError(
            f"{path}: a budget of {budget} bytes for a ({out}, {in_}) delta cannot hold one fp16 "
            f"singular vector pair ({2 * (out + in_)} bytes); raise --budget"
        )
    return k


def truncate(
    U: Tensor, S: Tensor, Vh: Tensor, budget: int, path: str, label: str | None = None
) -> HalfFactors:
    """The fp16 rank-``k`` truncation of ``U diag(S) Vᵀ`` that fits ``budget`` bytes."""
    k = rank_within(budget, U.shape[0], Vh.shape[1], path)
    return HalfFactors((U[:, :k] * S[:k]).half(), Vh[:k].half(), label=label)


LOW_RANK = register(
    CompressMethod(
        name="low-rank",
        paper="Ping et al. 2024, Delta-CoMe (its low-rank baseline), arXiv:2406.08903",
        fn=compress_low_rank,
        params=NoParams,
        summary="fp16 truncated SVD with as many ranks as the budget holds",
        factored=True,
        uses_calibration=False,
    )
)
