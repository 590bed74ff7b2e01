"""Low-rank linear algebra shared by the merge methods: pure functions over factors.

A weighted sum of LoRAs is itself a product of stacked factors::

    Σ_i w_i s_i B_i A_i = B_cat A_cat,   B_cat = [B_1 … B_n]  (out × R),
                                         A_cat = [w_1 s_1 A_1; …; w_n s_n A_n]  (R × in)

so its SVD never needs the dense ``out × in`` matrix: with ``B_cat = Q_b R_b`` and
``A_catᵀ = Q_a R_a`` (thin QR), ``B_cat A_cat = Q_b (R_b R_aᵀ) Q_aᵀ`` and the SVD of the small
``R × R`` core gives the exact singular triplets (Eckart–Young: the top ``K`` are the best rank-K
approximation). Dense matrices (TIES/DARE results) are brought back to rank K with a seeded
randomized SVD (Halko, Martinsson & Tropp 2011) instead of a full SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (B (out, r), A (r, in)), ΔW = B A


def stack_weighted(factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]) -> Factors:
    """``(B_cat, A_cat)`` with ``B_cat A_cat = Σ w_i s_i B_i A_i``; factors given as ``(A, B, s)``."""
    b = torch.cat([B.float() for _, B, _ in factors], dim=1)  # (out, R)
    a = torch.cat([A.float() * (w * s) for (A, _, s), w in zip(factors, weights, strict=True)], 0)  # (R, in)
    return b, a


def factored_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD ``U diag(S) Vᵀ`` of ``b @ a`` (``(out, R) @ (R, in)``) without forming it.

    Returns ``U (out, R')``, ``S (R',)``, ``Vh (R', in)`` with ``R' = min(R, out, in)``, S descending.
    """
    q_b, r_b = torch.linalg.qr(b.double())  # (out, R'), (R', R)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, R''), (R'', R)
    core = r_b @ r_a.T  # (R', R'')
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    return (q_b @ u_c).float(), s.float(), (vh_c @ q_a.T).float()  # (out, ·), (·,), (·, in)


def split_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> Factors:
    """Top-``rank`` triplets as balanced factors ``B = U √S``, ``A = √S Vᵀ``."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # (out, K), (K, in)


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of ``b @ a`` in factored form (exact, via QR + small SVD)."""
    return split_svd(*factored_svd(b, a), rank)


def randomized_svd(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    iters: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of a dense ``matrix`` by a seeded randomized range finder.

    ``Y = (M Mᵀ)^q M Ω`` with Gaussian ``Ω`` of ``rank + oversample`` columns, QR-orthonormalised
    after every product; then the SVD of the small ``Qᵀ M``. Costs ``O(out · in · (rank + p) · q)``
    instead of a full SVD's ``O(out · in · min(out, in))``.
    """
    m = matrix.float()
    out_dim, in_dim = m.shape
    width = min(rank + oversample, out_dim, in_dim)
    omega = torch.randn(in_dim, width, generator=generator, dtype=m.dtype).to(m.device)  # (in, p)
    q, _ = torch.linalg.qr(m @ omega)  # (out, p)
    for _ in range(iters):
        q, _ = torch.linalg.qr(m.T @ q)  # (in, p)
        q, _ = torch.linalg.qr(m @ q)  # (out, p)
    small = q.T @ m  # (p, in)
    u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_s)[:, :rank], s[:rank], vh[:rank]


def dense_to_rank(
    matrix: Tensor, rank: int, *, iters: int = 4, generator: torch.Generator | None = None
) -> Factors:
    """Rank-``rank`` factors of a dense matrix: exact SVD when small, randomized otherwise."""
    if rank >= min(matrix.shape) or min(matrix.shape) <= 4 * (rank + 10):
        u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        return split_svd(u, s, vh, min(rank, s.shape[0]))
    return split_svd(*randomized_svd(matrix, rank, iters=iters, generator=generator), rank)
