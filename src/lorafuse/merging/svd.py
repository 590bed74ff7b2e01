"""``svd``: the best rank-K approximation of ``Σ w_i s_i B_i A_i``, in factored form.

QR of the stacked factors and an SVD of the small ``Σr × Σr`` core (see
:mod:`lorafuse.merging.factored`), never the full SVD of a dense ``out × in`` matrix that PEFT's
``svd`` runs. Default ``K = max r_i`` (PEFT's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lorafuse.merging.factored import stack_weighted, truncate_factors
from lorafuse.merging.registry import FactorTriple, MergeMethod, NoParams, register


def merge_svd(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: NoParams,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    rank = rank or max(a.shape[0] for a, _, _ in factors)
    return truncate_factors(*stack_weighted(factors, weights), rank)


SVD = register(
    MergeMethod(
        name="svd",
        paper="Eckart & Young 1936, The approximation of one matrix by another of lower rank, "
        "Psychometrika 1(3)",
        fn=merge_svd,
        params=NoParams,
        summary="best rank-K approximation of Σ w_i ΔW_i",
        exact=False,
    )
)
