"""The sparsify-and-merge family on ``ΔW``: TIES, DARE, DARE-TIES and magnitude pruning.

Settings of one method, not copies (mergekit's view). Per module, with ``τ_i = s_i B_i A_i``
(dense, one module at a time):

1. **sparsify** each ``τ_i``: ``magnitude`` keeps the ``⌊density · numel⌋`` largest ``|τ_i|``
   (TIES, Yadav et al. 2023, arXiv 2306.01708); ``random`` keeps each entry with probability
   ``density`` and rescales by ``1/density`` (DARE, Yu et al. 2024, arXiv 2311.03099), seeded;
2. **elect signs** (TIES, DARE-TIES): ``γ = sign(Σ_i τ̂_i)`` (``total``) or
   ``sign(Σ_i sign τ̂_i)`` (``frequency``), ties going to ``+``;
3. **merge**: with consensus, the disjoint mean ``Σ_i w_i τ̂_i [sign τ̂_i = γ] / max(1, #agreeing)``;
   without, the weighted sum ``Σ_i w_i τ̂_i``;
4. bring the result back to rank ``K`` (default ``max r_i``) with a seeded randomized SVD.

Steps 1–3 follow PEFT's ``merge_utils`` exactly (signs elected on the unweighted tensors), but on
``ΔW``, not on ``A`` and ``B`` separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lorafuse.merging.factored import dense_to_rank
from lorafuse.merging.registry import FactorTriple, MergeMethod, register


class SparsifyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each ΔW_i kept")
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_iters: int = Field(4, ge=0, le=20, description="power iterations of the randomized SVD")


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``⌊density · numel⌋`` entries of largest magnitude."""
    keep = int(density * tau.numel())
    if keep >= tau.numel():
        return torch.ones_like(tau, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    threshold = magnitude.flatten().kthvalue(tau.numel() - keep + 1).values
    return magnitude >= threshold


def sparsify(tau: Tensor, density: float, how: str, generator: torch.Generator) -> Tensor:
    if density >= 1.0:
        return tau
    if how == "magnitude":
        return tau * magnitude_mask(tau, density)
    keep = torch.rand(tau.shape, generator=generator) < density  # Bernoulli(density)
    return tau * keep.to(tau.device) / density


def elect_and_merge(taus: Tensor, weights: Tensor, consensus: bool, sign_method: str) -> Tensor:
    """Step 3 on stacked sparsified tensors ``taus (n, out, in)``; returns ``(out, in)``."""
    weighted = taus * weights.view(-1, 1, 1)  # (n, out, in)
    if not consensus:
        return weighted.sum(0)
    signs = taus.sign()
    strength = taus.sum(0) if sign_method == "total" else signs.sum(0)  # (out, in)
    majority = torch.where(strength >= 0, 1.0, -1.0)
    agree = signs == majority  # (n, out, in)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def merge_sparse(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: SparsifyParams,
    generator: torch.Generator,
    *,
    how: str,
    consensus: bool,
) -> tuple[Tensor, Tensor]:
    taus = torch.stack(
        [sparsify(s * (B.float() @ A.float()), params.density, how, generator) for A, B, s in factors]
    )
    merged = elect_and_merge(taus, torch.tensor(list(weights)), consensus, params.majority_sign_method)
    del taus
    return dense_to_rank(
        merged,
        rank or max(a.shape[0] for a, _, _ in factors),
        iters=params.svd_iters,
        generator=generator,
    )


for _name, _how, _consensus, _summary in [
    ("ties", "magnitude", True, "TIES: trim by magnitude, elect signs, disjoint mean, on ΔW"),
    ("dare_linear", "random", False, "DARE: random drop + rescale, weighted sum, on ΔW"),
    ("dare_ties", "random", True, "DARE + TIES sign election, on ΔW"),
    ("magnitude_prune", "magnitude", False, "trim by magnitude, weighted sum, on ΔW"),
]:
    register(
        MergeMethod(
            _name,
            partial(merge_sparse, how=_how, consensus=_consensus),
            SparsifyParams,
            _summary,
            exact=False,
        )
    )
