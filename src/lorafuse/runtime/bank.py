"""The bank module wrapped around each adapted linear layer, and the weight sources feeding it.

``LoRABank`` keeps the original layer untouched as ``base`` and adds the stacked LoRA factors as
non-persistent buffers: ``y = base(x) + ((x Aᵀ) ⊙ expand(w)) Bᵀ`` (see
:mod:`lorafuse.runtime.functional`). Where the weights ``w`` come from is a :class:`WeightSource`:
static weights now; LoRA-Flow gates and routers later compute them from the hidden states.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lorafuse.runtime.functional import bank_delta, check_weights, expand_weights, rank_index

_LAYER_RE = re.compile(r"\.(\d+)\.")


@runtime_checkable
class WeightSource(Protocol):
    """Gives a bank its weights for the current forward pass, or ``None`` for "base only"."""

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        """Weights of shape ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)`` for input ``x``."""
        ...


class StaticWeights:
    """One weight tensor shared by every bank: ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)``."""

    def __init__(self, weights: Tensor, k: int) -> None:
        self.k = k
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.set(weights)

    def set(self, weights: Tensor) -> None:
        self.weights = check_weights(weights, self.k).detach()
        self._cache = {}
        self.all_zero = not bool(self.weights.any())

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        if self.all_zero:
            return None
        key = (bank.A.device, bank.A.dtype)
        if key not in self._cache:
            self._cache[key] = self.weights.to(device=bank.A.device, dtype=bank.A.dtype)
        return self._cache[key]


class LoRABank(nn.Module):
    """A linear layer plus a bank of k LoRAs: ``y = base(x) + ((x Aᵀ) ⊙ expand(w)) Bᵀ``."""

    def __init__(
        self,
        base: nn.Module,
        A: Tensor,
        B: Tensor,
        ranks: list[int],
        source: WeightSource,
        path: str,
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)  # (R, in), scales folded in
        self.register_buffer("B", B, persistent=False)  # (out, R)
        self.register_buffer("rank_index", rank_index(ranks).to(A.device), persistent=False)  # (R,)
        self.ranks = list(ranks)
        self.set_source(source)
        self.path = path
        match = _LAYER_RE.search(f".{path}.")
        self.layer_index: int | None = int(match.group(1)) if match else None

    @property
    def k(self) -> int:
        return len(self.ranks)

    def set_source(self, source: WeightSource) -> None:
        """Feed this bank from ``source``. A source that is an ``nn.Module`` (gates, routers) is not
        registered as a submodule: it stays out of the model's parameters and state dict."""
        object.__setattr__(self, "source", source)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, ranks={self.ranks}, dtype={self.A.dtype}"

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        y = self.base(x, *args, **kwargs)
        if self.A.shape[0] == 0:
            return y
        weights = self.source.weights_for(self, x)
        if weights is None:
            return y
        w = expand_weights(weights, self.rank_index, x.shape, self.path)  # broadcasts to (..., R)
        delta = bank_delta(x.to(self.A.dtype), self.A, self.B, w)  # (..., out)
        return y + delta.to(y.dtype)
