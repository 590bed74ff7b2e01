"""What a compressed module is: quantized factors, fp16 factors, signs, or a quantized dense delta.

Every kind knows its exact size (``nbytes`` = the bytes of the tensors it writes), turns itself
into safetensors tensors + JSON metadata and back, and rebuilds ``ΔŴ``; the low-rank kinds also
give factors ``(B (out, r), A (r, in))`` with ``ΔŴ = B A``, so the runtime serves them like a LoRA
without ever forming ``ΔŴ``. Pure tensor maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from lorafuse.compress.packing import pack_bits, packed_nbytes, unpack_bits
from lorafuse.compress.quantize import QuantizedMatrix


class CompressedModule(Protocol):
    kind: ClassVar[str]
    factored: ClassVar[bool]

    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...
    def delta(self) -> Tensor: ...
    def factors(self) -> tuple[Tensor, Tensor]: ...
    def to_tensors(self, prefix: str) -> dict[str, Tensor]: ...
    def meta(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class QuantFactors:
    """Delta-CoMe: ``ΔŴ = Û diag(S) V̂ᵀ`` with ``Û``, ``V̂`` quantized in mixed-precision segments."""

    kind: ClassVar[str] = "quant_factors"
    factored: ClassVar[bool] = True
    S: Tensor  # (r,) float32
    V: tuple[QuantizedMatrix, ...]  # segment i: (r_i, in) rows of Vᵀ
    U: tuple[QuantizedMatrix, ...]  # segment i: (out, r_i) columns of U
    estimated_error: float | None = None
    label: str | None = None  # the schedule that made it ("paper", "auto", "4:3,2:*", ...)

    @property
    def shape(self) -> tuple[int, int]:
        return self.U[0].shape[0], self.V[0].shape[1]

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``[(vectors, bits)]``, largest singular values first."""
        return [(v.shape[0], v.bits) for v in self.V]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.to_tensors("m").values())

    def factors(self) -> tuple[Tensor, Tensor]:
        A = torch.cat([v.dequantize() for v in self.V], dim=0)  # (r, in)
        B = torch.cat([u.dequantize() for u in self.U], dim=1) * self.S.float()  # (out, r)
        return B, A

    def delta(self) -> Tensor:
        B, A = self.factors()
        return B @ A  # (out, in)

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        tensors = {f"{prefix}.S": self.S.float()}
        for i, (v, u) in enumerate(zip(self.V, self.U, strict=True)):
            v_tensors = v.to_tensors(f"{prefix}.V{i}")
            if i and self.V[0].perm is not None:  # every Vᵀ segment shares H_x's act-order: stored once
                v_tensors.pop(f"{prefix}.V{i}.perm")
            tensors |= v_tensors | u.to_tensors(f"{prefix}.U{i}")
        return tensors

    def meta(self) -> dict[str, Any]:
        return {
            "segments": self.segments,
            "V": [v.meta() for v in self.V],
            "U": [u.meta() for u in self.U],
            "estimated_error": self.estimated_error,
            "label": self.label,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> QuantFactors:
        tensors = dict(tensors)
        if f"{prefix}.V0.perm" in tensors:
            for i in range(1, len(meta["V"])):
                tensors[f"{prefix}.V{i}.perm"] = tensors[f"{prefix}.V0.perm"]
        V = tuple(QuantizedMatrix.from_tensors(tensors, f"{prefix}.V{i}", m) for i, m in enumerate(meta["V"]))
        U = tuple(QuantizedMatrix.from_tensors(tensors, f"{prefix}.U{i}", m) for i, m in enumerate(meta["U"]))
        return cls(tensors[f"{prefix}.S"], V, U, meta.get("estimated_error"), meta.get("label"))


@dataclass(frozen=True)
class HalfFactors:
    """Low-rank truncation: ``ΔŴ = B A`` with ``B = U_k diag(S_k)``, ``A = V_kᵀ`` in fp16."""

    kind: ClassVar[str] = "half_factors"
    factored: ClassVar[bool] = True
    B: Tensor  # (out, k) float16
    A: Tensor  # (k, in) float16
    label: str | None = None  # "low-rank" when Delta-CoMe's ``best`` chose the truncation

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return self.B.numel() * 2 + self.A.numel() * 2

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.B.float(), self.A.float()

    def delta(self) -> Tensor:
        return self.B.float() @ self.A.float()

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.B": self.B.half(), f"{prefix}.A": self.A.half()}

    def meta(self) -> dict[str, Any]:
        return {"rank": int(self.A.shape[0]), "label": self.label}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> HalfFactors:
        return cls(tensors[f"{prefix}.B"], tensors[f"{prefix}.A"], meta.get("label"))


@dataclass(frozen=True)
class SignDelta:
    """BitDelta: ``ΔŴ = α · sign(ΔW)``, one bit per weight and one fp32 scale per matrix."""

    kind: ClassVar[str] = "sign"
    factored: ClassVar[bool] = False
    signs: Tensor  # (out, in) bool, True = positive
    alpha: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.signs.shape[0]), int(self.signs.shape[1])

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.signs.numel(), 1) + 4

    def delta(self) -> Tensor:
        return self.alpha * (self.signs.float() * 2 - 1)

    def factors(self) -> tuple[Tensor, Tensor]:
        raise TypeError("a sign delta is dense (full rank); it has no low-rank factors")

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}.signs": pack_bits(self.signs.to(torch.uint8), 1),
            f"{prefix}.alpha": torch.tensor([self.alpha], dtype=torch.float32),
        }

    def meta(self) -> dict[str, Any]:
        return {"rows": self.shape[0], "cols": self.shape[1]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> SignDelta:
        rows, cols = meta["rows"], meta["cols"]
        signs = unpack_bits(tensors[f"{prefix}.signs"], 1, rows * cols).reshape(rows, cols).bool()
        return cls(signs, float(tensors[f"{prefix}.alpha"].item()))


@dataclass(frozen=True)
class DenseQuant:
    """RTN of the dense delta: ``ΔŴ = Q(ΔW)``."""

    kind: ClassVar[str] = "dense_quant"
    factored: ClassVar[bool] = False
    q: QuantizedMatrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes

    def delta(self) -> Tensor:
        return self.q.dequantize()

    def factors(self) -> tuple[Tensor, Tensor]:
        raise TypeError("a quantized dense delta is full rank; it has no low-rank factors")

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return self.q.to_tensors(f"{prefix}.q")

    def meta(self) -> dict[str, Any]:
        return self.q.meta()

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> DenseQuant:
        return cls(QuantizedMatrix.from_tensors(tensors, f"{prefix}.q", meta))


KINDS: dict[str, Any] = {k.kind: k for k in (QuantFactors, HalfFactors, SignDelta, DenseQuant)}
