"""The registry of delta-compression methods and their one shared signature.

Every method compresses one linear layer's delta at a time::

    fn(delta (out, in), hessian (in, in) | None, budget_bytes, params, path) -> CompressedModule

``hessian`` is ``Σ x xᵀ`` over calibration inputs of the layer (``None``: no calibration),
``budget_bytes`` the module's share of the budget, ``params`` the method's validated pydantic
settings, ``path`` the module path for error messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from lorafuse._registry import FrozenParams, NoParams, Registry
from lorafuse.compress.types import CompressedModule
from lorafuse.errors import CompressError

__all__ = ["COMPRESS_METHODS", "CompressFn", "CompressMethod", "NoParams", "Params", "get_method", "register"]

CompressFn = Callable[[Tensor, "Tensor | None", int, FrozenParams, str], CompressedModule]

Params = FrozenParams  # base of every method's settings: frozen, unknown keys refused


@dataclass(frozen=True, kw_only=True)
class CompressMethod:
    """One compression method: its name, source, settings and the per-module compressor."""

    name: str
    paper: str  # citation; empty for a baseline without one
    fn: CompressFn
    params: type[FrozenParams]
    summary: str
    factored: bool  # served as a low-rank adapter (B A) without forming ΔW
    uses_calibration: bool


COMPRESS_METHODS: Registry[CompressMethod] = Registry("compression method", error=CompressError)
register = COMPRESS_METHODS.register
get_method = COMPRESS_METHODS.get
