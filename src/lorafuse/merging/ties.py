"""The sparsify-and-merge family on ``ΔW``: TIES, DARE, DARE-TIES and magnitude pruning.

Settings of one method, not copies (mergekit's view). Per module, with ``τ_i = s_i B_i A_i``
(dense, one module at a time):

1. **sparsify** each ``τ_i``: ``magnitude`` keeps the ``⌊density · numel⌋`` largest ``|τ_i|``
   (TIES, Yadav et al. 2023, arXiv:2306.01708); ``random`` keeps each entry with probability
   ``density`` and rescales by ``1/density`` (DARE, Yu et al. 2024, arXiv:2311.03099), seeded;
2. **elect signs** (TIES, DARE-TIES) and take the disjoint mean, in PEFT's convention (signs of the
   unweighted deltas, divided by the count of agreeing deltas; the default) or mergekit's (signs of
   the weighted deltas, divided by the sum of the agreeing weights), ``convention`` below; without
   consensus (DARE-linear, magnitude-prune), the weighted sum ``Σ_i w_i τ̂_i``;
3. bring the result back to rank ``K`` (default ``max r_i``) with a seeded randomized SVD.

The maths is :mod:`lorafuse.merging.functional`. With ``convention="peft"`` steps 1–2 equal
PEFT's ``merge_utils`` (``ties``, ``dare_ties``, ...); with ``convention="mergekit"`` they equal
mergekit 0.1.5's ``ties`` (and its sign election and normalized merge for ``dare_ties`` with
``normalize: true``; its DARE draws differ: it rescales the kept entries to ``τ_i``'s L1 norm,
not by ``1/density``) — both on ``ΔW``, not on ``A`` and ``B`` separately. Measured against both
peers by ``bench/mergekit_parity.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from lorafuse._registry import FrozenParams
from lorafuse.merging.factored import dense_to_rank
from lorafuse.merging.functional import Sparsification, elect_and_merge, magnitude_mask, sparsify
from lorafuse.merging.registry import FactorTriple, MergeMethod, register

__all__ = ["SparsifyParams", "elect_and_merge", "magnitude_mask", "merge_sparse", "sparsify"]

TIES_PAPER = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708"
DARE_PAPER = (
    "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
    "as a Free Lunch (DARE), arXiv:2311.03099"
)


class SparsifyParams(FrozenParams):
    """Settings of the sparsify-and-merge family (``majority_sign_method`` and ``convention`` act
    only with sign consensus: TIES and DARE-TIES)."""

    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each ΔW_i kept")
    majority_sign_method: Literal["total", "frequency"] = "total"
    convention: Literal["peft", "mergekit"] = Field(
        "peft",
        description="peft: signs of the unweighted deltas, ÷ count of agreeing; "
        "mergekit: signs of the weighted deltas, ÷ sum of agreeing weights",
    )
    svd_iters: int = Field(4, ge=0, le=20, description="power iterations of the randomized SVD")


def merge_sparse(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: SparsifyParams,
    generator: torch.Generator,
    *,
    how: Sparsification,
    consensus: bool,
) -> tuple[Tensor, Tensor]:
    taus = torch.stack(
        [sparsify(s * (B.float() @ A.float()), params.density, how, generator) for A, B, s in factors]
    )
    merged = elect_and_merge(
        taus, torch.tensor(list(weights)), consensus, params.majority_sign_method, params.convention
    )
    del taus
    return dense_to_rank(
        merged,
        rank or max(a.shape[0] for a, _, _ in factors),
        iters=params.svd_iters,
        generator=generator,
    )


for _name, _paper, _how, _consensus, _summary in [
    ("ties", TIES_PAPER, "magnitude", True, "TIES: trim by magnitude, elect signs, disjoint mean, on ΔW"),
    ("dare-linear", DARE_PAPER, "random", False, "DARE: random drop + rescale, weighted sum, on ΔW"),
    ("dare-ties", DARE_PAPER + "; " + TIES_PAPER, "random", True, "DARE + TIES sign election, on ΔW"),
    ("magnitude-prune", "", "magnitude", False, "trim by magnitude, weighted sum, on ΔW"),
]:
    register(
        MergeMethod(
            name=_name,
            paper=_paper,
            fn=partial(merge_sparse, how=_how, consensus=_consensus),
            params=SparsifyParams,
            summary=_summary,
            exact=False,
        )
    )
