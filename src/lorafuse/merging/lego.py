"""``lego``: LoRA-LEGO, rank-wise clustering of Minimal Semantic Units (arXiv 2409.16167).

Every rank-1 pair of every LoRA is a Minimal Semantic Unit (MSU): LoRA i contributes
``ΔW_i = Σ_j b_j a_jᵀ`` with ``b_j = √|c_i| B_i[:, j]``, ``a_j = sign(c_i) √|c_i| A_i[j]`` and
``c_i = w_i s_i``. Per module:

1. fix each MSU's sign (``(b, a)`` and ``(−b, −a)`` are the same unit): the entry of ``a`` with
   the largest magnitude is made positive;
2. cluster the features ``[a/‖a‖, b/‖b‖]`` into ``K`` groups with k-means (scikit-learn,
   k-means++ initialisation, seeded), MSUs taken in a canonical order so that permuting ranks
   does not change the result;
3. each centroid ``(ā, b̄)`` (the mean of the raw members) becomes one rank of the merged LoRA;
4. *parameter reweighting*: rescale ``ā`` and ``b̄`` to the mean norm of their members' ``a`` and
   ``b``; *output reweighting*: scale ``ΔW`` by ``√(r/K)`` with ``r`` the mean input rank.

Merging one LoRA at its own rank returns it unchanged; LoRAs of different ranks mix freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from lorafuse._registry import FrozenParams
from lorafuse.merging.registry import FactorTriple, MergeMethod, register


class LegoParams(FrozenParams):
    n_init: int = Field(10, ge=1, description="k-means restarts (best inertia kept)")
    max_iter: int = Field(300, ge=1)
    parameter_reweighting: bool = True
    output_reweighting: bool = True


def minimal_semantic_units(
    factors: Sequence[FactorTriple], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """All MSUs as rows: ``a (N, in)``, ``b (N, out)`` with ``Σ_j b_j a_jᵀ = Σ_i w_i s_i B_i A_i``."""
    a_rows, b_rows = [], []
    for (A, B, s), w in zip(factors, weights, strict=True):
        c = float(w) * float(s)
        root = math.sqrt(abs(c))
        a_rows.append(A.double() * (root * (1.0 if c >= 0 else -1.0)))  # (r_i, in)
        b_rows.append(B.double().T * root)  # (r_i, out)
    return torch.cat(a_rows), torch.cat(b_rows)


def fix_signs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Flip ``(a_j, b_j)`` to ``(−a_j, −b_j)`` where the largest-magnitude entry of ``a_j`` is < 0."""
    pivot = a.gather(1, a.abs().argmax(1, keepdim=True))  # (N, 1)
    flip = torch.where(pivot < 0, -1.0, 1.0).to(a.dtype)
    return a * flip, b * flip


def merge_lego(
    factors: Sequence[FactorTriple],
    weights: Sequence[float],
    rank: int | None,
    params: LegoParams,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    ranks = [A.shape[0] for A, _, _ in factors]
    k = rank or max(ranks)
    a, b = fix_signs(*minimal_semantic_units(factors, weights))  # (N, in), (N, out)
    a_norm = a.norm(dim=1).clamp_min(1e-30)  # (N,)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    features = torch.cat([a / a_norm[:, None], b / b_norm[:, None]], 1)  # (N, in + out)
    probe = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0), dtype=features.dtype)
    order = torch.argsort(features @ probe)  # canonical order: invariant to rank permutations
    a, b, a_norm, b_norm, features = (
        a[order],
        b[order],
        a_norm[order],
        b_norm[order],
        features[order],
    )

    if k >= a.shape[0]:
        labels = torch.arange(a.shape[0])
        k = a.shape[0]
    else:
        from sklearn.cluster import KMeans  # imported here: scikit-learn is slow to import

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        kmeans = KMeans(
            k, init="k-means++", n_init=params.n_init, max_iter=params.max_iter, random_state=seed
        )
        labels = torch.from_numpy(kmeans.fit_predict(features.numpy()))

    centroid_a = torch.zeros(k, a.shape[1], dtype=a.dtype).index_add_(0, labels, a)  # (K, in)
    centroid_b = torch.zeros(k, b.shape[1], dtype=b.dtype).index_add_(0, labels, b)  # (K, out)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(a.dtype)[:, None]  # (K, 1)
    centroid_a, centroid_b = centroid_a / counts, centroid_b / counts
    if params.parameter_reweighting:
        mean_a = torch.zeros(k, dtype=a.dtype).index_add_(0, labels, a_norm)[:, None] / counts
        mean_b = torch.zeros(k, dtype=b.dtype).index_add_(0, labels, b_norm)[:, None] / counts
        centroid_a = centroid_a * mean_a / centroid_a.norm(dim=1, keepdim=True).clamp_min(1e-30)
        centroid_b = centroid_b * mean_b / centroid_b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if params.output_reweighting:
        centroid_a = centroid_a * math.sqrt(sum(ranks) / len(ranks) / k)
    return centroid_b.T.float(), centroid_a.float()  # (out, K), (K, in)


LEGO = register(
    MergeMethod(
        name="lego",
        paper="Zhao et al. 2024, Merging LoRAs like Playing LEGO: Enhancing the Modularity of LoRA "
        "with Rank-Wise Clustering, arXiv:2409.16167",
        fn=merge_lego,
        params=LegoParams,
        summary="LoRA-LEGO: k-means over rank-1 units",
        exact=False,
    )
)
