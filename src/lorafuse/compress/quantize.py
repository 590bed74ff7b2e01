"""Asymmetric group quantizers over tensors: round-to-nearest (RTN) and GPTQ.

A matrix ``W`` ``(rows, cols)`` is quantized along its columns (the layer's input dimension) in
groups of ``g`` consecutive columns; each row of each group has a scale ``s`` and an integer
zero point ``z`` (``b`` bits, like the codes)::

    q = clamp(round(w / s) + z, 0, 2^b − 1),   ŵ = s · (q − z),
    s = (max − min) / (2^b − 1),                z = round(−min / s).

GPTQ (Frantar et al., 2022, arXiv 2210.17323) quantizes one column at a time and spreads each
column's error over the columns not yet quantized, minimising ``‖(W − Ŵ) X‖²_F`` for inputs ``X``
through the Hessian ``H = X Xᵀ`` (``(cols, cols)``): with ``U`` the upper Cholesky factor of
``(H + λI)⁻¹`` (``λ = damp · mean diag H``), ``e = (w_j − ŵ_j) / U_jj`` and
``W_{:, j:} −= e U_{j, j:}``. With act-order, columns go by decreasing ``diag H``. A matrix can
be split into column *segments* of different bit widths (mixed precision); groups never cross a
segment and act-order permutes inside each segment only. Pure tensor maths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafuse.compress.packing import pack_bits, packed_nbytes, unpack_bits

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def quant_nbytes(
    rows: int, cols: int, bits: int, group_size: int, scale_dtype: str = "float16", act_order: bool = False
) -> int:
    """Exact bytes of a quantized ``(rows, cols)`` matrix: codes, zero points, scales, permutation."""
    groups = -(-cols // group_size)
    scale_bytes = SCALE_DTYPES[scale_dtype].itemsize
    perm = cols * (2 if cols <= 32767 else 4) if act_order else 0
    return (
        packed_nbytes(rows * cols, bits)
        + packed_nbytes(rows * groups, bits)
        + rows * groups * scale_bytes
        + perm
    )


@dataclass(frozen=True)
class QuantizedMatrix:
    """Codes ``(rows, cols)`` in processing order, per-group ``scales``/``zeros`` ``(rows, groups)``."""

    codes: Tensor  # (rows, cols) uint8, columns in processing order
    scales: Tensor  # (rows, groups) float16/float32
    zeros: Tensor  # (rows, groups) uint8
    bits: int
    group_size: int
    perm: Tensor | None = None  # (cols,) processing order → original column, or None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    @property
    def scale_dtype(self) -> str:
        return str(self.scales.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        rows, cols = self.shape
        return quant_nbytes(rows, cols, self.bits, self.group_size, self.scale_dtype, self.perm is not None)

    def dequantize(self) -> Tensor:
        """``Ŵ`` ``(rows, cols)`` in fp32, columns in their original order."""
        cols = self.shape[1]
        group = torch.arange(cols) // self.group_size  # (cols,)
        w = (self.codes.float() - self.zeros.float()[:, group]) * self.scales.float()[:, group]
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Packed tensors for a safetensors file (their ``nbytes`` sum to :attr:`nbytes`)."""
        tensors = {
            f"{prefix}.codes": pack_bits(self.codes, self.bits),
            f"{prefix}.zeros": pack_bits(self.zeros, self.bits),
            f"{prefix}.scales": self.scales.contiguous(),
        }
        if self.perm is not None:
            dtype = torch.int16 if self.shape[1] <= 32767 else torch.int32
            tensors[f"{prefix}.perm"] = self.perm.to(dtype)
        return tensors

    def meta(self) -> dict[str, int]:
        rows, cols = self.shape
        return {"rows": rows, "cols": cols, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, int]) -> QuantizedMatrix:
        rows, cols, bits, group = meta["rows"], meta["cols"], meta["bits"], meta["group_size"]
        groups = -(-cols // group)
        codes = unpack_bits(tensors[f"{prefix}.codes"], bits, rows * cols).reshape(rows, cols)
        zeros = unpack_bits(tensors[f"{prefix}.zeros"], bits, rows * groups).reshape(rows, groups)
        perm = tensors.get(f"{prefix}.perm")
        return cls(
            codes, tensors[f"{prefix}.scales"], zeros, bits, group, None if perm is None else perm.long()
        )


def _params(x: Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric ``(scale, zero)`` of ``x`` ``(rows, k)``; scale rounded to its stored dtype."""
    maxq = (1 << bits) - 1
    lo, hi = x.min(dim=1).values, x.max(dim=1).values  # (rows,)
    flat = hi == lo  # a constant row: make the value itself representable
    lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
    both_zero = hi == lo
    lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
    scale = ((hi - lo) / maxq).to(scale_dtype).float()
    tiny = 2.0**-24 if scale_dtype == torch.float16 else torch.finfo(torch.float32).tiny
    scale = scale.clamp_min(tiny)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _quant(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def rtn_quantize(
    W: Tensor, bits: int, group_size: int | None = 128, scale_dtype: str = "float16"
) -> QuantizedMatrix:
    """Round-to-nearest, asymmetric, groups of ``group_size`` columns (``None``: one group per row)."""
    cols = W.shape[1]
    g = min(group_size or cols, cols)
    dtype = SCALE_DTYPES[scale_dtype]
    W = W.float()
    codes, scales, zeros = [], [], []
    for start in range(0, cols, g):
        block = W[:, start : start + g]  # (rows, g)
        scale, zero = _params(block, bits, dtype)
        codes.append(_quant(block, scale[:, None], zero[:, None], bits))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedMatrix(
        torch.cat(codes, dim=1).to(torch.uint8),
        torch.stack(scales, dim=1).to(dtype),
        torch.stack(zeros, dim=1).to(torch.uint8),
        bits,
        g,
    )


def gptq_quantize_segments(
    W: Tensor,
    H: Tensor,
    segments: Sequence[tuple[int, int]],
    *,
    group_size: int = 128,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    scale_dtype: str = "float16",
) -> list[QuantizedMatrix]:
    """GPTQ of ``W`` ``(rows, cols)`` with ``H`` ``(cols, cols)``, column segments ``[(width, bits)]``.

    Returns one :class:`QuantizedMatrix` per segment, for ``W[:, segment]``. The error of every
    column is compensated on all later columns, across segments.
    """
    rows, cols = W.shape
    if sum(w for w, _ in segments) != cols or H.shape != (cols, cols):
        raise ValueError(f"segments {list(segments)} / H {tuple(H.shape)} do not fit W {tuple(W.shape)}")
    dtype = SCALE_DTYPES[scale_dtype]
    W = W.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    starts = [sum(w for w, _ in segments[:i]) for i in range(len(segments))]
    perm = torch.arange(cols)
    if act_order:
        diag = torch.diag(H)
        for start, (width, _) in zip(starts, segments, strict=True):
            order = torch.argsort(diag[start : start + width], descending=True, stable=True)
            perm[start : start + width] = start + order
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (cols, cols)

    col_bits = torch.empty(cols, dtype=torch.long)
    group_end = torch.full((cols,), -1, dtype=torch.long)  # end of the group starting at j, else −1
    for start, (width, bits) in zip(starts, segments, strict=True):
        col_bits[start : start + width] = bits
        for g0 in range(start, start + width, group_size):
            group_end[g0] = min(g0 + group_size, start + width)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales: list[Tensor] = []
    zeros: list[Tensor] = []
    scale = zero = torch.zeros(rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()  # (rows, blk)
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            bits = int(col_bits[j])
            end = int(group_end[j])
            if end >= 0:  # a new group: its parameters from the current (compensated) weights
                stats = W1[:, i : min(end, i2) - i1]
                if end > i2:
                    stats = torch.cat([stats, W[:, i2:end]], dim=1)
                scale, zero = _params(stats, bits, dtype)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = _quant(w, scale, zero, bits)
            codes[:, j] = q.to(torch.uint8)
            e = (w - scale * (q - zero)) / U[j, j]
            W1[:, i:] -= e[:, None] * U[j, j:i2][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]

    out, gi = [], 0
    for start, (width, bits) in zip(starts, segments, strict=True):
        n = -(-width // group_size)
        seg_perm = perm[start : start + width] - start if act_order else None
        out.append(
            QuantizedMatrix(
                codes[:, start : start + width].clone(),
                torch.stack(scales[gi : gi + n], dim=1).to(dtype),
                torch.stack(zeros[gi : gi + n], dim=1).to(torch.uint8),
                bits,
                min(group_size, width),
                seg_perm,
            )
        )
        gi += n
    return out


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    *,
    group_size: int = 128,
    act_order: bool = True,
    damp: float = 0.01,
    scale_dtype: str = "float16",
) -> QuantizedMatrix:
    """GPTQ of ``W`` ``(rows, cols)`` at one bit width (see :func:`gptq_quantize_segments`)."""
    (q,) = gptq_quantize_segments(
        W,
        H,
        [(W.shape[1], bits)],
        group_size=group_size,
        act_order=act_order,
        damp=damp,
        scale_dtype=scale_dtype,
    )
    return q
