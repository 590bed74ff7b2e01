"""The registry of merge methods and their one shared signature.

Every method merges one module at a time::

    fn(factors, weights, rank, params, generator) -> (B (out, K), A (K, in))

``factors`` is a list of ``(A_i, B_i, s_i)`` (the LoRAs that have this module), ``weights`` the
matching ``w_i``, ``rank`` the requested output rank (``None`` = the method's default), ``params``
the method's validated pydantic settings. The merged module is ``ΔW = B A`` (scale 1).

Names are hyphenated (``dare-ties``, ``magnitude-prune``); the underscore spellings of earlier
recipes and saved metadata (``dare_ties``) still resolve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafuse._registry import FrozenParams, NoParams, Registry

__all__ = ["MERGE_METHODS", "FactorTriple", "MergeFn", "MergeMethod", "NoParams", "get_method", "register"]

FactorTriple = tuple[Tensor, Tensor, float]  # (A (r, in), B (out, r), scale)
MergeFn = Callable[
    [Sequence[FactorTriple], Sequence[float], "int | None", FrozenParams, torch.Generator],
    tuple[Tensor, Tensor],
]


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    """One merge method: its name, source, settings and the function that merges one module."""

    name: str
    paper: str  # citation; empty for a baseline without one
    fn: MergeFn
    params: type[FrozenParams]
    summary: str
    exact: bool  # the result equals Σ w_i ΔW_i exactly (no rank reduction, no sparsification)


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")
register = MERGE_METHODS.register
get_method = MERGE_METHODS.get
