"""The softmax router (the baseline): learned softmax weights over the top-k experts.

MixLoRA (Li et al., 2024, arXiv 2404.15159) / Switch (Fedus et al., 2021, arXiv 2101.03961):
``w(t) = scatter(softmax(top-k of l(t)))``, ``(B, T, n)``, trained by backprop with the language
loss plus ``α · mean_l [n · Σ_i f_{l,i} P_{l,i}]`` (load balancing over the valid tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse._registry import NoParams
from lorafuse.route.functional import load_balance_loss, softmax_topk_weights
from lorafuse.route.router import RouterSource, RoutingSettings, register


class SoftmaxRouting:
    name = "softmax"
    paper = (
        "Li et al. 2024, MixLoRA, arXiv:2404.15159; Fedus et al. 2021, Switch Transformers, arXiv:2101.03961"
    )
    params = NoParams  # top-k and the balance weight are the mixture's settings
    summary = "learned softmax weights over the top-k experts, load-balancing loss"
    detach_input = False

    def route(self, source: RouterSource, layer: int, logits: Tensor) -> Tensor:
        weights, indices = softmax_topk_weights(logits, source.router.k)  # (B, T, n), (B, T, k)
        if logits.requires_grad:
            mask = source.token_mask(logits)
            source.aux.append(load_balance_loss(logits.softmax(-1), indices, mask))
        return weights

    def training_loss(
        self, source: RouterSource, settings: RoutingSettings, generator: torch.Generator
    ) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
        return softmax_loss(source, settings.balance)


def softmax_loss(source: RouterSource, balance: float) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """``loss_fn`` for the shared loop: language loss + ``balance`` × mean load-balancing loss."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        source.aux = []
        loss = model(**batch).loss
        aux = sum(source.aux) / max(len(source.aux), 1)
        source.aux = []
        return loss + balance * aux

    return loss_fn


register(SoftmaxRouting())
