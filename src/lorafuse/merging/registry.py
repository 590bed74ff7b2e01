"""The explicit registry of merge methods and their one shared signature.

Every method merges one module at a time::

    fn(factors, weights, rank, params, generator) -> (B (out, K), A (K, in))

``factors`` is a list of ``(A_i, B_i, s_i)`` (the LoRAs that have this module), ``weights`` the
matching ``w_i``, ``rank`` the requested output rank (``None`` = the method's default), ``params``
the method's validated pydantic settings. The merged module is ``ΔW = B A`` (scale 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

FactorTriple = tuple[Tensor, Tensor, float]  # (A (r, in), B (out, r), scale)
MergeFn = Callable[
    [Sequence[FactorTriple], Sequence[float], "int | None", BaseModel, torch.Generator],
    tuple[Tensor, Tensor],
]


class NoParams(BaseModel):
    """A method without settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: type[BaseModel]
    summary: str
    exact: bool  # the result equals Σ w_i ΔW_i exactly (no rank reduction, no sparsification)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in MERGE_METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    MERGE_METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(MERGE_METHODS)}") from None
