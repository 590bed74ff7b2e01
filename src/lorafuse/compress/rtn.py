"""``rtn``: round-to-nearest of the dense delta at ``b = ⌊8 · budget / (out·in)⌋`` bits per weight.

Asymmetric, one fp16 scale and one ``b``-bit zero point per row by default (``group_size`` sets
groups of columns instead). Like ``bitdelta`` its size is fixed by ``b``: it is accepted when the
codes fit the budget (``b ≥ 1``, i.e. a ratio ``≥ 1/16``), and the scales and zero points on top
are counted in the reported size.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from lorafuse.compress.quantize import rtn_quantize
from lorafuse.compress.registry import CompressMethod, Params, register
from lorafuse.compress.types import DenseQuant
from lorafuse.errors import BudgetError


class RTNParams(Params):
    group_size: int | None = Field(None, ge=1)  # None: one group per row


def compress_rtn(
    delta: Tensor, hessian: Tensor | None, budget: int, params: RTNParams, path: str
) -> DenseQuant:
    out, in_ = delta.shape
    bits = min(8, (8 * budget) // (out * in_))
    if bits < 1:
        raise BudgetError(
            f"{path}: rtn needs at least one bit per weight ({(out * in_ + 7) // 8} bytes for "
            f"({out}, {in_})), more than the budget of {budget} bytes; it needs a budget ≥ 1/16"
        )
    return DenseQuant(rtn_quantize(delta.float(), bits, params.group_size))


RTN = register(
    CompressMethod(
        name="rtn",
        paper="",
        fn=compress_rtn,
        params=RTNParams,
        summary="round-to-nearest of the dense ΔW at ⌊16·ratio⌋ bits, per-row scale and zero point",
        factored=False,
        uses_calibration=False,
    )
)
