"""The tensor maths of the sparsify-and-merge family (TIES, DARE), on dense task deltas.

Pure functions over stacked task deltas ``τ (n, out, in)`` and weights ``w (n,)``:

1. **trim**: :func:`magnitude_mask` keeps the ``⌊density · numel⌋`` entries of largest ``|τ_i|``
   (TIES, Yadav et al. 2023, arXiv:2306.01708); :func:`sparsify` with ``random`` keeps each
   entry with probability ``p = density`` and rescales by ``1/p`` (DARE, Yu et al. 2024,
   arXiv:2311.03099), so ``E[τ̂_i] = τ_i``;
2. **elect** a sign per entry and **merge** the agreeing deltas (:func:`elect_and_merge`). Two
   conventions, the peers' own:

   - ``peft`` (``peft.utils.merge_utils.ties`` / ``dare_ties``): the signs are elected on the
     *unweighted* trimmed deltas, ``γ = sign(Σ_i τ̂_i)`` (``total``) or ``sign(Σ_i sign τ̂_i)``
     (``frequency``), and the disjoint mean divides by the *count* of agreeing deltas::

         ΔW = Σ_i w_i τ̂_i [sign τ̂_i = γ] / max(1, Σ_i [sign τ̂_i = γ])

   - ``mergekit`` (``generalized_task_arithmetic`` with ``normalize: true``, mergekit 0.1.5): the
     signs are elected on the *weighted* trimmed deltas, ``γ = sign(Σ_i w_i τ̂_i)`` (``total``,
     mergekit's ``sum``) or ``sign(Σ_i sign(w_i τ̂_i))`` (``frequency``, its ``count``), and the
     result divides by the *sum of the agreeing weights* (a zero sum counts as 1)::

         ΔW = Σ_i w_i τ̂_i [sign(w_i τ̂_i) = γ] / Σ_i w_i [sign(w_i τ̂_i) = γ]

   Ties in the election go to ``+``; a trimmed entry (``τ̂ = 0``) never agrees. At weights all 1
   the two conventions are the same function. Without sign consensus (DARE-linear, magnitude
   pruning) both give the weighted sum ``Σ_i w_i τ̂_i``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Convention = Literal["peft", "mergekit"]
SignMethod = Literal["total", "frequency"]
Sparsification = Literal["magnitude", "random"]


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``⌊density · numel⌋`` entries of largest magnitude (TIES' trim)."""
    keep = int(density * tau.numel())
    if keep >= tau.numel():
        return torch.ones_like(tau, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    threshold = magnitude.flatten().kthvalue(tau.numel() - keep + 1).values
    return magnitude >= threshold


def sparsify(tau: Tensor, density: float, how: Sparsification, generator: torch.Generator) -> Tensor:
    """``τ̂``: magnitude trim, or DARE's seeded Bernoulli(``density``) drop with ``1/density`` rescale."""
    if density >= 1.0:
        return tau
    if how == "magnitude":
        return tau * magnitude_mask(tau, density)
    keep = torch.rand(tau.shape, generator=generator) < density  # Bernoulli(density)
    return tau * keep.to(tau.device) / density


def majority_agreement(voters: Tensor, sign_method: SignMethod) -> Tensor:
    """``[sign v_i = γ]`` ``(n, out, in)`` with ``γ = sign(Σ_i v_i)`` or ``sign(Σ_i sign v_i)``, ties → +."""
    signs = voters.sign()  # (n, out, in)
    strength = voters.sum(0) if sign_method == "total" else signs.sum(0)  # (out, in)
    majority = torch.where(strength >= 0, 1.0, -1.0)  # (out, in)
    return signs == majority


def elect_and_merge(
    taus: Tensor,
    weights: Tensor,
    consensus: bool,
    sign_method: SignMethod,
    convention: Convention = "peft",
) -> Tensor:
    """Elect signs and merge the trimmed ``taus (n, out, in)`` with ``weights (n,)``; ``(out, in)``.

    See the module docstring for both conventions' formulas.
    """
    weighted = taus * weights.view(-1, 1, 1)  # (n, out, in)
    if not consensus:
        return weighted.sum(0)
    if convention == "peft":
        agree = majority_agreement(taus, sign_method)  # (n, out, in)
        return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)
    agree = majority_agreement(weighted, sign_method)  # (n, out, in)
    divisor = (weights.view(-1, 1, 1) * agree).sum(0)  # (out, in)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
