"""Per-module summaries of a LoRA for the catalogue, computed from r×r matrices only.

For one module ``ΔW = s · B A`` (``A`` is ``(r, in)``, ``B`` is ``(out, r)``):

- ``‖ΔW‖_F = |s| · sqrt(trace((BᵀB)(AAᵀ)))``, two r×r Gram matrices, never ``ΔW`` itself;
- the **direction** is ``ΔW``'s top right singular vector ``v₁ ∈ R^in`` (Arrow's prototype,
  arXiv 2405.11157): the input direction the module amplifies most. With ``BᵀB = R_Bᵀ R_B``
  (``R_B = Λ^{1/2} Uᵀ`` from the eigendecomposition of the Gram matrix, so a rank-deficient ``B``
  is fine), ``ΔWᵀΔW = s² (R_B A)ᵀ (R_B A)``: the right singular vectors of ``ΔW`` are those of the
  r×in matrix ``C = R_B A``. Its top left singular vector ``u`` is the top eigenvector of the r×r
  matrix ``C Cᵀ = R_B (AAᵀ) R_Bᵀ``, and ``v₁ = Cᵀ u / σ``. The sign of a singular vector is
  arbitrary; it is fixed here so that the largest entry of ``v₁`` is positive (similarity uses
  ``|cos|`` anyway).

Cost per module: two Gram products (``r² · (in + out)`` multiply-adds, float32 unless the factors
are float64) and r×r eigensolves in float64. :func:`summarize_many` does the same for many
modules at once, one batched product and eigensolve per group of equal shapes (a LoRA's modules
of one kind across its layers), which is what indexing a library spends its time on. Pure tensor
maths: no transformers, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ModuleSummary:
    """``‖s·BA‖_F``, the top singular value ``σ₁`` of ``s·BA`` and its right singular vector."""

    norm: float
    sigma1: float
    direction: Tensor  # (in,) float32, unit norm (zeros for a zero ΔW)


def summarize_factors(A: Tensor, B: Tensor, scale: float) -> ModuleSummary:
    """Norm, top singular value and top right singular vector of ``scale · B @ A`` (factored)."""
    # The two Gram products (the only work proportional to in/out) in float32, or float64 for
    # float64 factors; everything r×r in float64.
    wide = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    a = A.detach().to(wide)  # (r, in)
    b = B.detach().to(wide)  # (out, r)
    gram_a = (a @ a.T).double()  # (r, r)
    gram_b = (b.T @ b).double()  # (r, r)
    norm_sq = float((gram_a * gram_b).sum())  # trace((BᵀB)(AAᵀ)), both symmetric
    evals, evecs = torch.linalg.eigh(gram_b)
    r_b = evals.clamp_min(0).sqrt().unsqueeze(1) * evecs.T  # (r, r): R_Bᵀ R_B = BᵀB
    core = r_b @ gram_a @ r_b.T  # (r, r) = C Cᵀ with C = R_B A
    core = (core + core.T) / 2
    lam, u = torch.linalg.eigh(core)
    top = max(float(lam[-1]), 0.0)
    direction = torch.zeros(a.shape[1], dtype=torch.float64)
    if top > 0:
        v = (a.T @ (r_b.T @ u[:, -1]).to(wide)).double()  # (in,) = Cᵀ u
        length = float(v.norm())
        if length > 0:
            direction = v / length
            if direction[direction.abs().argmax()] < 0:
                direction = -direction
    s = abs(float(scale))
    return ModuleSummary(s * math.sqrt(max(norm_sq, 0.0)), s * math.sqrt(top), direction.float())


def summarize_many(
    factors: Sequence[tuple[Tensor, Tensor, float]], max_batch_bytes: int = 32 << 20
) -> list[ModuleSummary]:
    """:func:`summarize_factors` of every ``(A, B, scale)`` in ``factors``, in order, batched over
    the factors of equal shapes and dtype (the same maths on ``(M, r, in)`` stacks of at most
    ``max_batch_bytes`` each, so memory stays that of a few modules)."""
    out: list[ModuleSummary | None] = [None] * len(factors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (a, b, _) in enumerate(factors):
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, b.dtype), []).append(i)
    batches = []
    for (a_shape, b_shape, a_dtype, b_dtype), members in groups.items():
        per_module = 8 * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])  # the float64 worst case
        size = max(1, max_batch_bytes // per_module)
        batches += [(a_dtype, b_dtype, members[j : j + size]) for j in range(0, len(members), size)]
    for a_dtype, b_dtype, members in batches:
        if len(members) == 1:
            i = members[0]
            out[i] = summarize_factors(*factors[i])
            continue
        wide = torch.float64 if torch.float64 in (a_dtype, b_dtype) else torch.float32
        a = torch.stack([factors[i][0].detach() for i in members]).to(wide)  # (M, r, in)
        b = torch.stack([factors[i][1].detach() for i in members]).to(wide)  # (M, out, r)
        gram_a = (a @ a.mT).double()  # (M, r, r)
        gram_b = (b.mT @ b).double()  # (M, r, r)
        norm_sq = (gram_a * gram_b).sum((-2, -1))  # (M,)
        evals, evecs = torch.linalg.eigh(gram_b)  # (M, r), (M, r, r)
        r_b = evals.clamp_min(0).sqrt().unsqueeze(-1) * evecs.mT  # (M, r, r)
        core = r_b @ gram_a @ r_b.mT  # (M, r, r)
        lam, u = torch.linalg.eigh((core + core.mT) / 2)  # (M, r), (M, r, r)
        top = lam[:, -1].clamp_min(0)  # (M,)
        v = (a.mT @ (r_b.mT @ u[:, :, -1:]).to(wide)).squeeze(-1).double()  # (M, in) = Cᵀ u
        length = v.norm(dim=-1, keepdim=True)  # (M, 1)
        keep = (top > 0).unsqueeze(-1) & (length > 0)  # (M, 1)
        direction = torch.where(keep, v / length.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        peak = direction.gather(-1, direction.abs().argmax(-1, keepdim=True))  # (M, 1)
        direction = torch.where(peak < 0, -direction, direction).float()  # (M, in)
        for j, i in enumerate(members):
            s = abs(float(factors[i][2]))
            out[i] = ModuleSummary(
                s * math.sqrt(max(float(norm_sq[j]), 0.0)), s * math.sqrt(float(top[j])), direction[j].clone()
            )
    return [summary for summary in out if summary is not None]


def direction_bytes(direction: Tensor) -> bytes:
    """The float16 bytes a direction is stored as."""
    return direction.to(torch.float16).contiguous().numpy().tobytes()


def direction_from_bytes(blob: bytes) -> Tensor:
    """A stored direction back as a float32 vector."""
    return torch.frombuffer(bytearray(blob), dtype=torch.float16).float()
