"""``delta-come``: mixed-precision quantization of the delta's singular vectors (arXiv 2406.08903).

``ΔW = U diag(S) Vᵀ`` (fp32 SVD). The leading vectors are split into segments of falling bit
width (:mod:`lorafuse.compress.budget`: the paper's ``8:2,3:32,2:*``, a custom schedule, or
``auto``); the tail is dropped. As in the paper, ``Vᵀ``'s rows are quantized first with GPTQ on
the layer inputs' Hessian ``H_x = Σ x xᵀ``, then ``U``'s columns with the Hessian of
``z = diag(S) V̂ᵀ x``: ``H_z = diag(S) V̂ᵀ H_x V̂ diag(S)`` (``(r, r)``). ``S`` stays apart, in
fp32. Without calibration ``H = I`` (GPTQ then reduces to round-to-nearest).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from lorafuse.compress.budget import auto_allocate, fit_schedule, parse_schedule, vector_errors
from lorafuse.compress.quantize import QuantizedMatrix, gptq_quantize, gptq_quantize_segments, rtn_quantize
from lorafuse.compress.registry import CompressMethod, Params, register
from lorafuse.compress.types import QuantFactors


class DeltaCoMeParams(Params):
    schedule: str = "8:2,3:32,2:*"  # or "auto", or "BITS:COUNT,..." with * = as many as fit
    quantizer: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(128, ge=1)
    act_order: bool = True
    damp: float = Field(0.01, ge=0.0, le=1e6, allow_inf_nan=False)


def compress_delta_come(
    delta: Tensor, hessian: Tensor | None, budget: int, params: DeltaCoMeParams, path: str
) -> QuantFactors:
    out, in_ = delta.shape
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, r), (r,), (r, in)
    act_order = params.act_order and params.quantizer == "gptq"
    estimate = None
    if params.schedule == "auto":
        eps = vector_errors(U, Vh, params.group_size)
        segments, estimate = auto_allocate(
            S, eps, out, in_, budget, group_size=params.group_size, act_order=act_order, path=path
        )
    else:
        segments = fit_schedule(
            parse_schedule(params.schedule),
            out,
            in_,
            budget,
            max_rank=S.numel(),
            group_size=params.group_size,
            act_order=act_order,
            path=path,
        )
    k = sum(n for n, _ in segments)
    S, U, Vh = S[:k], U[:, :k], Vh[:k]
    H = torch.eye(in_) if hessian is None else hessian.float()
    V_q: list[QuantizedMatrix] = []
    start = 0
    for n, bits in segments:
        rows = Vh[start : start + n]  # (n, in)
        if params.quantizer == "gptq":
            V_q.append(gptq_quantize(rows, H, bits, group_size=params.group_size, damp=params.damp))
        else:
            V_q.append(rtn_quantize(rows, bits, params.group_size))
        start += n
    if params.quantizer == "gptq":
        Vh_hat = torch.cat([v.dequantize() for v in V_q], dim=0)  # (k, in)
        SV = S[:, None] * Vh_hat  # (k, in): z = SV x
        H_z = SV @ H @ SV.T  # (k, k)
        U_q = gptq_quantize_segments(U, H_z, segments, group_size=params.group_size, damp=params.damp)
    else:
        U_q, start = [], 0
        for n, bits in segments:
            U_q.append(rtn_quantize(U[:, start : start + n], bits, params.group_size))
            start += n
    return QuantFactors(S.float().clone(), tuple(V_q), tuple(U_q), estimate)


DELTA_COME = register(
    CompressMethod(
        "delta-come",
        compress_delta_come,
        DeltaCoMeParams,
        "SVD; singular vectors in mixed-precision segments (8/3/2 bits), GPTQ on calibration inputs",
        factored=True,
        uses_calibration=True,
    )
)
