"""``cat``: exact concatenation of ranks (PEFT's ``cat`` combination).

``ΔW = Σ w_i s_i B_i A_i = [B_1 … B_n] [w_1 s_1 A_1; …; w_n s_n A_n]``: rank ``Σ r_i``, exact for
any weights and signs, and the cost at inference of one LoRA of that rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lorafuse.merging.factored import stack_weighted
from lorafuse.merging.registry import FactorTriple, MergeMethod, NoParams, register


def merge_cat(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: NoParams,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    if rank is not None and rank != sum(a.shape[0] for a, _, _ in factors):
        raise ValueError("cat keeps every rank (Σ r_i); use method 'svd' to choose a rank")
    return stack_weighted(factors, weights)


CAT = register(
    MergeMethod(
        name="cat",
        paper="",
        fn=merge_cat,
        params=NoParams,
        summary="exact concatenation of ranks (Σ r_i); not the learned CAT weights of fusion",
        exact=True,
    )
)
