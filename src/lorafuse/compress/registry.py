"""The explicit registry of delta-compression methods and their one shared signature.

Every method compresses one linear layer's delta at a time::

    fn(delta (out, in), hessian (in, in) | None, budget_bytes, params, path) -> CompressedModule

``hessian`` is ``Σ x xᵀ`` over calibration inputs of the layer (``None``: no calibration),
``budget_bytes`` the module's share of the budget, ``params`` the method's validated pydantic
settings, ``path`` the module path for error messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from lorafuse.compress.types import CompressedModule
from lorafuse.errors import CompressError

CompressFn = Callable[[Tensor, "Tensor | None", int, BaseModel, str], CompressedModule]


class Params(BaseModel):
    """Base of every method's settings: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class CompressMethod:
    name: str
    fn: CompressFn
    params: type[Params]
    summary: str
    factored: bool  # served as a low-rank adapter (B A) without forming ΔW
    uses_calibration: bool


COMPRESS_METHODS: dict[str, CompressMethod] = {}


def register(method: CompressMethod) -> CompressMethod:
    if method.name in COMPRESS_METHODS:
        raise ValueError(f"compression method {method.name!r} is registered twice")
    COMPRESS_METHODS[method.name] = method
    return method


def get_method(name: str) -> CompressMethod:
    try:
        return COMPRESS_METHODS[name]
    except KeyError:
        raise CompressError(
            f"unknown compression method {name!r}; choose one of {sorted(COMPRESS_METHODS)}"
        ) from None
