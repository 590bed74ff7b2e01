"""The per-layer router and the hooks that feed a LoRA bank from it.

One router per decoder layer ``l``: logits ``l_l(t) = W_l · rms(x_l(t))`` over the n experts,
where ``x_l(t)`` is the residual stream entering layer ``l`` at token ``t`` (captured by
:class:`~lorafuse.runtime.LayerInputSource`, as for LoRA-Flow) and
``rms(x) = x / sqrt(mean(x²) + ε)`` (parameter-free). What the logits become (softmax over the
top-k, or ReMix's equal weights) is the routing *kind*, one file each
(:mod:`lorafuse.route.softmax`, :mod:`lorafuse.route.remix`), looked up in :data:`ROUTINGS`.

:class:`RouterSource` implements only the router's weight rule: weights are computed once per
layer per forward pass from the captured hidden state, so they follow ``model.generate`` step by
step with the KV cache (each step's hidden states are the new tokens' only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from lorafuse._registry import FrozenParams, Registry
from lorafuse.errors import LorafuseError
from lorafuse.runtime import ForwardCall, LayerInputSource, Reads


class RoutingKind(Protocol):
    """How router logits become bank weights; one implementation per method."""

    name: str
    paper: str  # citation of the method
    params: type[FrozenParams]
    summary: str
    detach_input: bool  # True: the router sees sg(x) (a policy trained by score functions)

    def route(self, source: RouterSource, layer: int, logits: Tensor) -> Tensor:
        """``(B, T, n)`` logits → ``(B, T, n)`` weights (zero outside the selected experts)."""
        ...

    def training_loss(
        self, source: RouterSource, settings: RoutingSettings, generator: torch.Generator
    ) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
        """The ``loss_fn`` the shared training loop minimises for this kind."""
        ...


class RoutingSettings(Protocol):
    """The mixture settings a routing kind's training loss reads."""

    samples: int  # ReMix: selections sampled per example
    balance: float  # softmax: weight of the load-balancing loss


ROUTINGS: Registry[RoutingKind] = Registry("router")
register = ROUTINGS.register


class Router(nn.Module):
    """Per-layer linear routers: ``weight`` is ``(L, n, H)``; ``logits(l, x) = rms(x) W_lᵀ``."""

    def __init__(self, kind: str, num_layers: int, hidden_size: int, n: int, k: int, *, seed: int = 0):
        super().__init__()
        kind = ROUTINGS.canonical(kind)  # an unknown kind: one error listing the choices
        if not 1 <= k <= n:
            raise LorafuseError(f"top-k must be between 1 and the number of experts {n}, got {k}")
        self.kind, self.n, self.k = kind, n, k
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_layers, n, hidden_size, generator=generator) * 0.02)

    @property
    def num_layers(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, layer: int, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, T, H)
        return x @ self.weight[layer].T  # (B, T, n)


class RouterSource(LayerInputSource):
    """Feeds every bank of layer ``l`` the weights routed from the residual entering layer ``l``.

    The router's weight rule (``reads = "layer"``) on :class:`~lorafuse.runtime.LayerInputSource`'s
    hooks. ``sampling`` (set by the ReMix loss) draws selections instead of the deterministic
    top-k and accumulates their log-probabilities in ``logp`` ``(B, T)``; ``aux`` collects
    per-layer auxiliary losses (load balancing); ``stats`` (when not ``None``) is called with
    ``(layer, weights (B, T, n), mask (B, T))`` for routing-health statistics.
    """

    reads: Reads = "layer"
    per_module = False

    def __init__(self, router: Router, model: nn.Module) -> None:
        self.router = router
        self.sampling = False
        self.generator: torch.Generator | None = None
        self.logp: Tensor | None = None
        self.aux: list[Tensor] = []
        self.stats: Callable[[int, Tensor, Tensor], None] | None = None
        super().__init__(model, self)
        if self.num_layers != router.num_layers:
            self.remove()
            raise LorafuseError(
                f"the router has {router.num_layers} layers but the model has {self.num_layers} "
                "decoder layers"
            )

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``route(W_l · rms(x_l))``: ``(B, T, n)`` weights, zero outside the selected experts."""
        if layer is None:
            raise LorafuseError(f"{path}: no routing weights for a module outside the decoder layers")
        kind = ROUTINGS[self.router.kind]
        logits = self.router.logits(layer, hidden.detach() if kind.detach_input else hidden)  # (B, T, n)
        weights = kind.route(self, layer, logits)  # (B, T, n)
        if self.stats is not None:
            self.stats(layer, weights.detach(), call.token_mask(hidden))
        return weights
