"""``linear`` / task arithmetic: ``ΔW = Σ w_i s_i B_i A_i`` (Ilharco et al. 2023, arXiv:2212.04089).

Unlike PEFT's ``linear``, which mixes ``A`` and ``B`` separately and so adds cross terms
``B_i A_j`` (PEFT issue 3004), this is exact for any signs. Without a rank it is the exact sum at
its numerical rank (≤ Σ r_i, directions with singular value ≤ ``tol · σ_max`` dropped); with
``rank=K`` it is the best rank-K approximation (the same as ``svd``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from lorafuse._registry import FrozenParams
from lorafuse.merging.factored import factored_svd, split_svd, stack_weighted
from lorafuse.merging.registry import FactorTriple, MergeMethod, register


class LinearParams(FrozenParams):
    tol: float = Field(
        1e-6, ge=0.0, allow_inf_nan=False, description="relative singular-value cut-off for the exact rank"
    )


def merge_linear(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: LinearParams,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    u, s, vh = factored_svd(*stack_weighted(factors, weights))
    if rank is None:
        rank = max(1, int((s > params.tol * s.max().clamp_min(1e-30)).sum()))
    return split_svd(u, s, vh, min(rank, s.shape[0]))


LINEAR = register(
    MergeMethod(
        name="linear",
        paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
        fn=merge_linear,
        params=LinearParams,
        summary="task arithmetic Σ w_i ΔW_i, exact",
        exact=True,
    ),
    aliases=("task-arithmetic", "task_arithmetic"),
)
