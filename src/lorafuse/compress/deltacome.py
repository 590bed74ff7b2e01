"""``delta-come``: mixed-precision quantization of the delta's singular vectors (arXiv 2406.08903).

``ΔW = U diag(S) Vᵀ`` (fp32 SVD). The leading vectors are split into segments of falling bit
width (:mod:`lorafuse.compress.budget`: the paper's ``8:2,3:32,2:*``, a custom schedule, or
``auto``); the tail is dropped. The default, ``best``, tries the paper's schedule, ``auto`` and
the fp16 low-rank truncation on the same SVD and keeps, per module, the one with the smallest
output error ``tr(E H Eᵀ)`` (``E = ΔŴ − ΔW``) on the calibration inputs — the error GPTQ
minimises — so at equal bytes it never does worse than either schedule or low-rank there
(without calibration, ``H = I``: the weight error).

As in the paper, ``Vᵀ``'s rows are quantized first with GPTQ on the layer inputs' Hessian
``H_x = Σ x xᵀ``, then ``U``'s columns with the Hessian of ``z = diag(S) V̂ᵀ x``:
``H_z = diag(S) V̂ᵀ H_x V̂ diag(S)`` (``(r, r)``). ``S`` stays apart, in fp32.
Without calibration ``H = I`` (GPTQ then reduces to round-to-nearest).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from lorafuse.compress.budget import auto_allocate, fit_schedule, parse_schedule, vector_errors
from lorafuse.compress.calibrate import output_energy
from lorafuse.compress.lowrank import truncate
from lorafuse.compress.quantize import QuantizedMatrix, gptq_quantize, gptq_quantize_segments, rtn_quantize
from lorafuse.compress.registry import CompressMethod, Params, register
from lorafuse.compress.types import HalfFactors, QuantFactors
from lorafuse.errors import BudgetError

BEST_CANDIDATES = ("8:2,3:32,2:*", "auto", "low-rank")


class DeltaCoMeParams(Params):
    schedule: str = "best"  # or "paper" (8:2,3:32,2:*), "auto", "BITS:COUNT,..." (* = as many as fit)
    quantizer: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(128, ge=1)
    act_order: bool = True
    damp: float = Field(0.01, ge=0.0, le=1e6, allow_inf_nan=False)


def output_error(approx: Tensor, delta: Tensor, hessian: Tensor | None) -> float:
    """``tr(E H Eᵀ)`` for ``E = approx − delta`` (``‖E‖_F²`` when ``hessian`` is None)."""
    return output_energy(approx.float() - delta.float(), hessian, torch.float32)


def compress_delta_come(
    delta: Tensor, hessian: Tensor | None, budget: int, params: DeltaCoMeParams, path: str
) -> QuantFactors | HalfFactors:
    """Compress one module's ``ΔW (out, in)`` within ``budget`` bytes (see the module docstring)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, r), (r,), (r, in)
    if params.schedule != "best":
        return _quantized(U, S, Vh, params.schedule, hessian, budget, params, path)
    best: tuple[float, QuantFactors | HalfFactors] | None = None
    problems = []
    for candidate in BEST_CANDIDATES:
        try:
            if candidate == "low-rank":
                module: QuantFactors | HalfFactors = truncate(U, S, Vh, budget, path, label="low-rank")
            else:
                module = _quantized(U, S, Vh, candidate, hessian, budget, params, path)
        except BudgetError as exc:
            problems.append(str(exc))
            continue
        error = output_error(module.delta(), delta, hessian)
        if best is None or error < best[0]:
            best = (error, module)
    if best is None:
        raise BudgetError(problems[0])
    return best[1]


def _quantized(
    U: Tensor,
    S: Tensor,
    Vh: Tensor,
    schedule: str,
    hessian: Tensor | None,
    budget: int,
    params: DeltaCoMeParams,
    path: str,
) -> QuantFactors:
    out, in_ = U.shape[0], Vh.shape[1]
    act_order = params.act_order and params.quantizer == "gptq"
    estimate = None
    if schedule == "auto":
        eps = vector_errors(U, Vh, params.group_size)
        segments, estimate = auto_allocate(
            S, eps, out, in_, budget, group_size=params.group_size, act_order=act_order, path=path
        )
    else:
        segments = fit_schedule(
            parse_schedule(schedule),
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
    label = "paper" if schedule in ("paper", "8:2,3:32,2:*") else schedule
    return QuantFactors(S.float().clone(), tuple(V_q), tuple(U_q), estimate, label=label)


DELTA_COME = register(
    CompressMethod(
        name="delta-come",
        paper="Ping et al. 2024, Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for "
        "Large Language Models, arXiv:2406.08903",
        fn=compress_delta_come,
        params=DeltaCoMeParams,
        summary="SVD; singular vectors in mixed-precision segments (8/3/2 bits), GPTQ on calibration inputs; "
        "by default the schedule (or fp16 low-rank) of least output error per module",
        factored=True,
        uses_calibration=True,
    )
)
