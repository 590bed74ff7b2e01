"""``bitdelta``: one bit per weight, ``ΔŴ = α · sign(ΔW)`` (Liu et al., 2024, arXiv 2402.10193).

``α = mean |ΔW|`` minimises ``‖ΔW − α sign(ΔW)‖_F``. The size is fixed: ``out·in/8`` bytes of
signs plus one fp32 scale, so the method is accepted when the sign bits fit the budget (ratio
``≥ 1/16``); its exact size (4 bytes over ``1/16`` per matrix) is reported, not hidden. The
paper's optional scale distillation (training the ``α`` of every matrix so the compressed
model's logits match the fine-tuned model's) is :func:`lorafuse.compress.distill.distill_scales`
(``lorafuse compress --method bitdelta --distill-steps 200 --calib FILE``).
"""

from __future__ import annotations

from torch import Tensor

from lorafuse.compress.packing import packed_nbytes
from lorafuse.compress.registry import CompressMethod, NoParams, register
from lorafuse.compress.types import SignDelta
from lorafuse.errors import BudgetError


def compress_bitdelta(
    delta: Tensor, hessian: Tensor | None, budget: int, params: NoParams, path: str
) -> SignDelta:
    out, in_ = delta.shape
    if packed_nbytes(out * in_, 1) > budget:
        raise BudgetError(
            f"{path}: bitdelta needs one bit per weight ({packed_nbytes(out * in_, 1)} bytes for "
            f"({out}, {in_})), more than the budget of {budget} bytes; it needs a budget ≥ 1/16"
        )
    delta = delta.float()
    return SignDelta(delta >= 0, float(delta.abs().mean()))


BITDELTA = register(
    CompressMethod(
        name="bitdelta",
        paper="Liu et al. 2024, BitDelta: Your Fine-Tune May Only Be Worth One Bit, arXiv:2402.10193",
        fn=compress_bitdelta,
        params=NoParams,
        summary="sign(ΔW) × one scale per matrix (α = mean|ΔW|); fixed 1 bit per weight",
        factored=False,
        uses_calibration=False,
    )
)
