"""The per-layer router and the hooks that feed a LoRA bank from it.

One router per decoder layer ``l``: logits ``l_l(t) = W_l · rms(x_l(t))`` over the n experts,
where ``x_l(t)`` is the residual stream entering layer ``l`` at token ``t`` (captured by a forward
pre-hook, as in LoRA-Flow) and ``rms(x) = x / sqrt(mean(x²) + ε)`` (parameter-free). What the
logits become (softmax over the top-k, or ReMix's equal weights) is the routing *kind*, one file
each (:mod:`lorafuse.route.softmax`, :mod:`lorafuse.route.remix`), looked up in :data:`ROUTINGS`.

:class:`RouterSource` is a :class:`~lorafuse.runtime.WeightSource`: weights are computed once per
layer per forward pass from the captured hidden state, so they follow ``model.generate`` step by
step with the KV cache (each step's hidden states are the new tokens' only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorafuse._layers import find_decoder_layers
from lorafuse._registry import FrozenParams, Registry
from lorafuse.errors import LorafuseError
from lorafuse.runtime.bank import LoRABank


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


class MaskTracker:
    """Keeps the 2-D ``attention_mask`` of the model's current forward call (a pre-hook on the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.mask: Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None

    def token_mask(self, x: Tensor) -> Tensor:
        """``(B, T)`` validity of the tokens in ``x (B, T, ·)``: the last T columns of the mask."""
        if self.mask is None or self.mask.shape[0] != x.shape[0]:
            return torch.ones(x.shape[:2], device=x.device)
        return self.mask[:, -x.shape[1] :].to(x.device).float()


class RouterSource:
    """Feeds every bank of layer ``l`` the weights routed from the residual entering layer ``l``.

    ``sampling`` (set by the ReMix loss) draws selections instead of the deterministic top-k and
    accumulates their log-probabilities in ``logp`` ``(B, T)``; ``aux`` collects per-layer
    auxiliary losses (load balancing); ``stats`` (when not ``None``) is called with
    ``(layer, weights (B, T, n), mask (B, T))`` for routing-health statistics.
    """

    def __init__(self, router: Router, model: nn.Module) -> None:
        self.router = router
        self.sampling = False
        self.generator: torch.Generator | None = None
        self.logp: Tensor | None = None
        self.aux: list[Tensor] = []
        self.stats: Callable[[int, Tensor, Tensor], None] | None = None
        self._weights: dict[int, Tensor] = {}
        layers = find_decoder_layers(model)[1]
        if len(layers) != router.num_layers:
            raise LorafuseError(
                f"the router has {router.num_layers} layers but the model has {len(layers)} decoder layers"
            )
        self._masks = MaskTracker(model)
        self._handles: list[RemovableHandle] = [self._masks.handle]
        self._handles += [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def token_mask(self, x: Tensor) -> Tensor:
        """``(B, T)`` validity of the tokens of the current pass (the model's attention mask)."""
        return self._masks.token_mask(x)

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            kind = ROUTINGS[self.router.kind]
            logits = self.router.logits(layer, x.detach() if kind.detach_input else x)  # (B, T, n)
            weights = kind.route(self, layer, logits)  # (B, T, n)
            self._weights[layer] = weights
            if self.stats is not None:
                self.stats(layer, weights.detach(), self.token_mask(x))

        return hook

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        if bank.layer_index is None or bank.layer_index not in self._weights:
            raise LorafuseError(f"{bank.path}: no routing weights for this module's layer")
        return self._weights[bank.layer_index].to(bank.A.dtype)

    def remove(self) -> None:
        """Remove the hooks (the bank keeps this source until another is set)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
