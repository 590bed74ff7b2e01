"""Pure tensor maths of routing among LoRAs (no transformers, no modules).

Notation: ``n`` experts (LoRAs), ``k`` selected per token, router logits ``l ∈ R^n``.

- Top-k selection and the two weightings of the selected experts:
  softmax over the top-k logits (MixLoRA / Switch style) or equal fixed weights ``1/k`` (ReMix).
- Sampling k experts without replacement with the Gumbel-top-k trick (Kool et al., 2019,
  arXiv 1903.06059); the log-probability of the sampled *ordered* selection under the
  Plackett–Luce sampler ``log p = Σ_j [l_{i_j} − log Σ_{m ∉ {i_1..i_{j−1}}} exp l_m]``.
  REINFORCE on the ordered selection is unbiased for any reward that only depends on the set.
- RLOO advantages (Kool et al., 2019, "Buy 4 REINFORCE samples, get a baseline for free"; ReMix):
  ``A_m = R_m − (1/(M−1)) Σ_{j≠m} R_j``.
- The usual load-balancing loss (Switch Transformer, arXiv 2101.03961; MixLoRA, arXiv 2404.15159):
  ``n · Σ_i f_i P_i``, ``f_i`` the share of routed slots going to expert i, ``P_i`` its mean
  router probability.
- Routing health: effective number of experts ``exp(H(p̄))`` of the mean routing distribution
  ``p̄`` and the share of the top expert ``max_i p̄_i``.
- Arrow prototypes (Ostapenko et al., 2024, arXiv 2405.11157): the top right singular vector of
  ``B A``, computed in factored form from the ``r × r`` core, never from a dense SVD of ``B A``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_indices(logits: Tensor, k: int) -> Tensor:
    """Deterministic top-k: ``(..., n)`` → ``(..., k)`` indices, largest first."""
    return logits.topk(k, dim=-1).indices


def equal_weights(indices: Tensor, n: int) -> Tensor:
    """ReMix weights: ``1/k`` on each selected expert, 0 elsewhere. ``(..., k)`` → ``(..., n)``."""
    k = indices.shape[-1]
    out = torch.zeros(*indices.shape[:-1], n, dtype=torch.float32, device=indices.device)
    return out.scatter(-1, indices, 1.0 / k)  # (..., n)


def softmax_topk_weights(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax over the top-k logits, scattered to ``(..., n)``; returns ``(weights, indices)``."""
    top = logits.topk(k, dim=-1)
    gates = torch.softmax(top.values, dim=-1)  # (..., k)
    return torch.zeros_like(logits).scatter(-1, top.indices, gates), top.indices


def gumbel_topk(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Sample k distinct experts (ordered) from the Plackett–Luce sampler: ``(..., n)`` → ``(..., k)``.

    ``argtopk(l + G)``, ``G ~ Gumbel(0, 1)`` i.i.d., draws the same ordered selection as sampling
    from ``softmax(l)`` k times without replacement.
    """
    u = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device)
    exponential = -torch.log(u.clamp_min(1e-20))  # Exp(1)
    gumbel = -torch.log(exponential.clamp_min(1e-20))  # Gumbel(0, 1)
    return (logits.detach() + gumbel).topk(k, dim=-1).indices


def plackett_luce_logprob(logits: Tensor, indices: Tensor) -> Tensor:
    """``log p(i_1, …, i_k)`` of an ordered selection without replacement; ``(..., n), (..., k)`` → ``(...)``.

    Plackett–Luce: ``Σ_j [l_{i_j} − logsumexp(l over the not yet chosen)]``.
    """
    logp = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    available = torch.zeros_like(logits, dtype=torch.bool).logical_not()  # (..., n)
    for j in range(indices.shape[-1]):
        chosen = indices[..., j : j + 1]  # (..., 1)
        masked = logits.masked_fill(~available, float("-inf"))
        logp = logp + logits.gather(-1, chosen).squeeze(-1) - torch.logsumexp(masked, dim=-1)
        available = available.scatter(-1, chosen, False)
    return logp  # (...)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """``A_m = R_m − mean_{j≠m} R_j`` over dim 0 (the M samples): ``(M, ...)`` → ``(M, ...)``."""
    m = rewards.shape[0]
    if m < 2:
        raise ValueError(f"RLOO needs at least 2 samples per example, got M={m}")
    return rewards - (rewards.sum(0, keepdim=True) - rewards) / (m - 1)


def sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy per sequence on labelled tokens. ``(B, T, V), (B, T)`` → ``(B,)``.

    ``labels`` are aligned with ``input_ids`` (HF convention): position t predicts label t+1;
    ``-100`` is ignored.
    """
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)  # (B, T-1)
    count = (target != -100).sum(1).clamp_min(1)
    return nll.sum(1) / count  # (B,)


def load_balance_loss(probs: Tensor, indices: Tensor, mask: Tensor | None = None) -> Tensor:
    """``n · Σ_i f_i P_i`` over the valid tokens. ``probs (..., n)``, ``indices (..., k)``, ``mask (...)``.

    ``f_i`` = share of the ``k · tokens`` routed slots that go to expert i; ``P_i`` = mean full
    softmax probability of expert i. Equals 1 for perfectly uniform routing.
    """
    n = probs.shape[-1]
    flat_p = probs.reshape(-1, n)  # (N, n)
    dispatch = torch.zeros_like(flat_p).scatter(-1, indices.reshape(-1, indices.shape[-1]), 1.0)  # (N, n)
    if mask is None:
        weight = torch.ones(flat_p.shape[0], device=probs.device, dtype=probs.dtype)
    else:
        weight = mask.reshape(-1).to(probs.dtype)  # (N,)
    total = weight.sum().clamp_min(1.0)
    f = (dispatch * weight[:, None]).sum(0) / (total * indices.shape[-1])  # (n,)
    p = (flat_p * weight[:, None]).sum(0) / total  # (n,)
    return n * (f.detach() * p).sum()


def effective_experts(distribution: Tensor) -> Tensor:
    """``exp(H(p))`` of a distribution over experts (last dim): 1 = one expert, n = uniform."""
    p = distribution / distribution.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return torch.exp(entropy)


def top_share(distribution: Tensor) -> Tensor:
    """Share of the most used expert in a distribution over experts (last dim)."""
    p = distribution / distribution.sum(-1, keepdim=True).clamp_min(1e-12)
    return p.max(-1).values


def top_right_singular_vector(A: Tensor, B: Tensor) -> Tensor:
    """Unit top right singular vector of ``B A`` (``A (r, in)``, ``B (out, r)``) in factored form.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR) give ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; with the
    ``r × r`` core ``R_B R_Aᵀ = U S Vᵀ`` the right singular vectors of ``B A`` are ``Q_A V``.
    Cost ``O((in + out) r²)``. The sign is arbitrary (Arrow scores ``|x · v|``). ``(in,)``.
    """
    _, r_b = torch.linalg.qr(B.double())  # (r, r)
    q_a, r_a = torch.linalg.qr(A.double().T)  # (in, r), (r, r)
    _, _, vh = torch.linalg.svd(r_b @ r_a.T)  # (r, r)
    return (q_a @ vh[0]).to(A.dtype)  # (in,)
