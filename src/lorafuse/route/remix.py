"""The ReMix router: equal fixed weights ``1/k`` on the selected experts, an RLOO-trained policy.

ReMix (Qiu et al. 2026, arXiv:2603.10160): the router is a policy over k-subsets
of the n experts; the selected experts get non-learnable weights ``1/k`` (so the router gets no
gradient from the language loss); it is trained with the REINFORCE leave-one-out estimator.
Per example, ``M`` selections are sampled (every token, every layer; Gumbel-top-k, i.e.
Plackett–Luce sampling without replacement), each with one forward pass of the base (the batch
is repeated M times, so the M passes run as one wide batch):

    R_m = −L_m                       (mean completion cross-entropy of sample m)
    A_m = R_m − mean_{j≠m} R_j       (RLOO)
    ∇ ≈ (1/M) Σ_m A_m ∇ log π(S_m)   log π(S_m) = Σ_{l,t} log PL(S_m,l,t | logits_l,t)

The experts train by ordinary backprop through the sampled paths (mean of the M losses). The
policy's input is detached, so the score-function term only reaches the routers. At inference
the selection is the deterministic top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse._registry import NoParams
from lorafuse.route.functional import (
    equal_weights,
    gumbel_topk,
    plackett_luce_logprob,
    rloo_advantages,
    sequence_losses,
    topk_indices,
)
from lorafuse.route.router import RouterSource, RoutingSettings, register


class RemixRouting:
    name = "remix"
    paper = (
        "Qiu et al. 2026, ReMix: Reinforcement Routing for Mixtures of LoRAs in LLM Finetuning, "
        "arXiv:2603.10160"
    )
    params = NoParams  # top-k and the number of samples are the mixture's settings
    summary = "equal fixed weights 1/k on the top-k experts, router trained by RLOO"
    detach_input = True

    def route(self, source: RouterSource, layer: int, logits: Tensor) -> Tensor:
        n, k = source.router.n, source.router.k
        if not source.sampling:
            return equal_weights(topk_indices(logits, k), n)  # (B, T, n)
        indices = gumbel_topk(logits, k, source.generator)  # (B, T, k)
        logp = plackett_luce_logprob(logits, indices) * source.token_mask(logits)  # (B, T)
        source.logp = logp if source.logp is None else source.logp + logp
        return equal_weights(indices, n)

    def training_loss(
        self, source: RouterSource, settings: RoutingSettings, generator: torch.Generator
    ) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
        return remix_loss(source, settings.samples, generator)


def remix_loss(
    source: RouterSource, samples: int, generator: torch.Generator
) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """``loss_fn`` for the shared loop: mean loss of M sampled selections + the RLOO surrogate.

    The surrogate ``−Σ A_m (log π_m − sg(log π_m)) / N`` (N = routed tokens in the repeated
    batch, a positive per-batch constant) is 0 in value, so the reported loss is the language
    loss, and its gradient is the RLOO estimate.
    """

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        rep = {key: value.repeat(samples, 1) for key, value in batch.items()}  # (M·B, T)
        source.sampling, source.generator, source.logp = True, generator, None
        try:
            logits = model(input_ids=rep["input_ids"], attention_mask=rep["attention_mask"]).logits
            logp = source.logp  # (M·B, T)
        finally:
            source.sampling, source.logp = False, None
        losses = sequence_losses(logits, rep["labels"])  # (M·B,)
        batch_size = batch["input_ids"].shape[0]
        advantages = rloo_advantages(-losses.detach().view(samples, batch_size)).reshape(-1)  # (M·B,)
        assert logp is not None
        per_row = logp.sum(1)  # (M·B,)
        tokens = rep["attention_mask"].sum().clamp_min(1)
        surrogate = -(advantages * (per_row - per_row.detach())).sum() / tokens
        return losses.mean() + surrogate

    return loss_fn


register(RemixRouting())
