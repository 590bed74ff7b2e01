"""Weights read from the model's hidden states: the hook plumbing written once, the rules apart.

LoRA-Flow gates, learned CAT weights, the routers, Arrow and the instance encoder differ only in
their *weight rule*: a function from what they read to per-LoRA weights ``w (n, 1|T, k)``::

    reads = "layer"   the residual stream entering the bank's decoder layer   (n, T, hidden)
            "first"   the residual stream entering the first decoder layer   (n, T, hidden)
            "module"  the bank's own input                                   (n, T, in)
            "none"    nothing (weights per module, e.g. learned CAT)

:class:`LayerInputSource` owns the rest: finding the decoder layers, a forward pre-hook on each
to capture its input, a pre-hook on the model for the call's attention mask / labels / ids, the
per-layer cache (a rule that is not per module runs once per layer and forward pass), spreading
the weights over the ranks, and ``remove()``. During generation each step's forward sees only the
new tokens, so weights follow ``generate`` with the KV cache unchanged.

One source can weight several groups of batch rows with different rules (a serving batch where
some rows use one LoRA-Flow fusion, others another): :meth:`LayerInputSource.fill` writes each
group's weights into its rows of a plan's coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorafuse._layers import find_decoder_layers, layer_index
from lorafuse.errors import LorafuseError
from lorafuse.runtime.bank import Coefficients, LoRABank
from lorafuse.runtime.functional import spread_weights, token_rows

Reads = Literal["layer", "first", "module", "none"]


@dataclass
class ForwardCall:
    """What the model's current forward call was given (rows sliced for a group of a batch)."""

    input_ids: Tensor | None = None  # (B, L)
    attention_mask: Tensor | None = None  # (B, L), 2-D masks only
    labels: Tensor | None = None  # (B, L)
    past_length: int = 0  # tokens already in the KV cache
    batch: int | None = None

    def token_mask(self, x: Tensor) -> Tensor:
        """``(B, T)`` validity of the tokens in ``x (B, T, ·)``: the last T columns of the mask."""
        mask = self.attention_mask
        if mask is None or mask.shape[0] != x.shape[0]:
            return torch.ones(x.shape[:2], device=x.device)
        return mask[:, -x.shape[1] :].to(x.device).float()

    def rows(self, index: Tensor | None) -> ForwardCall:
        if index is None:
            return self

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index.to(t.device))

        return ForwardCall(
            pick(self.input_ids), pick(self.attention_mask), pick(self.labels), self.past_length, len(index)
        )


class WeightRule(Protocol):
    """A method's weight rule: what it reads, and per-LoRA weights from it."""

    reads: Reads
    per_module: bool  # weights differ between the modules of one layer (else computed once per layer)

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``(n, 1|T, k)`` weights for ``hidden`` (what the rule reads; see the module docstring)."""
        ...


class LayerInputSource:
    """Feeds banks per-LoRA weights from weight rules, each over a group of batch rows.

    ``rules`` is one rule (every row) or ``[(rule, rows), ...]`` with ``rows (n,)`` long or
    ``None`` for every row. As a bank's :class:`~lorafuse.runtime.CoefficientSource` it serves an
    attached stack with one rule; :meth:`fill` serves a pool plan's groups. ``enabled=False``
    keeps the hooks idle until a pool uses the plan it belongs to (``AdapterPool.use`` turns it on
    and off), so a plan waiting for its turn ignores other batches' forward passes.
    """

    def __init__(
        self,
        model: nn.Module,
        rules: WeightRule | Sequence[tuple[WeightRule, Tensor | None]],
        *,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        groups = [(rules, None)] if not isinstance(rules, Sequence) else list(rules)
        self.groups: list[tuple[WeightRule, Tensor | None]] = groups
        self.call = ForwardCall()
        self._inputs: dict[int, Tensor] = {}  # layer → its input (B, T, hidden) of this forward
        self._cache: dict[tuple[int, int], Tensor] = {}  # (group, layer) → (n, 1|T, k)
        self._prefix: str | None = None
        self.num_layers: int | None = None
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True)
        ]
        if any(rule.reads in ("layer", "first") for rule, _ in groups):
            self._prefix, layers = find_decoder_layers(model)
            self.num_layers = len(layers)
            self._handles += [
                layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                for i, layer in enumerate(layers)
            ]

    @property
    def rule(self) -> WeightRule:
        """The rule of a source with one group (an attached stack's)."""
        if len(self.groups) != 1:
            raise LorafuseError(f"this source weights {len(self.groups)} groups of rows, not one")
        return self.groups[0][0]

    # -- hooks ----------------------------------------------------------------------------------
    def _on_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        mask, labels, cache = (
            kwargs.get("attention_mask"),
            kwargs.get("labels"),
            kwargs.get("past_key_values"),
        )
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        lead = ids if isinstance(ids, Tensor) else embeds if isinstance(embeds, Tensor) else None
        self.call = ForwardCall(
            ids if isinstance(ids, Tensor) else None,
            mask if isinstance(mask, Tensor) and mask.ndim == 2 else None,
            labels if isinstance(labels, Tensor) else None,
            int(past),
            int(lead.shape[0]) if lead is not None else None,
        )
        self._cache = {}

    def _capture(self, index: int) -> Callable[..., None]:
        """Keep layer ``index``'s input and compute, there, the weights of every rule that reads
        it once per layer (inside the layer's call, so gradient checkpointing recomputes them)."""

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.enabled:
                return
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, hidden)
            self._inputs[index] = x
            for group, (rule, rows) in enumerate(self.groups):
                if rule.per_module or rule.reads not in ("layer", "first"):
                    continue
                if rule.reads == "first" and index != 0:
                    continue
                hidden = x if rows is None else x.index_select(0, rows.to(x.device))
                key = (group, -1 if rule.reads == "first" else index)
                self._cache[key] = rule.weights(hidden, index, "", self.call.rows(rows))  # (n, 1|T, k)

        return capture

    def remove(self) -> None:
        """Remove the hooks (the banks keep this source until another is set)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def token_mask(self, x: Tensor) -> Tensor:
        """``(B, T)`` validity of the tokens of the current pass (the model's attention mask)."""
        return self.call.token_mask(x)

    # -- weights --------------------------------------------------------------------------------
    def layer_of(self, bank: LoRABank) -> int | None:
        return layer_index(bank.path, self._prefix) if self._prefix is not None else bank.layer_index

    def _read(self, rule: WeightRule, bank: LoRABank, x: Tensor, layer: int | None) -> Tensor:
        if rule.reads in ("layer", "first"):
            source = 0 if rule.reads == "first" else layer
            if source is None or source not in self._inputs:
                raise LorafuseError(
                    f"{bank.path}: no decoder-layer input captured for this module; weights read from "
                    "the decoder layers need every adapted module inside one list of numbered "
                    "decoder layers (like model.layers.<i>.…)"
                )
            return self._inputs[source]  # (B, T, hidden)
        batch = self.call.batch
        if x.ndim == 2 and batch and x.shape[0] % batch == 0:
            return token_rows(x, batch, x.shape[0] // batch, bank.path)  # (B, T, in)
        return x

    def weights_at(self, bank: LoRABank, x: Tensor, group: int = 0) -> Tensor:
        """``(n, 1|T, k)`` weights of group ``group``'s rule for ``bank`` (cached per layer)."""
        rule, rows = self.groups[group]
        layer = self.layer_of(bank)
        key = (group, -1 if rule.reads == "first" else (layer if layer is not None else -2))
        if not rule.per_module and rule.reads in ("layer", "first") and key in self._cache:
            return self._cache[key]
        hidden = self._read(rule, bank, x, layer)
        if rows is not None:
            hidden = hidden.index_select(0, rows.to(hidden.device))
        w = rule.weights(hidden, layer, bank.path, self.call.rows(rows))  # (n, 1|T, k)
        if not rule.per_module and rule.reads in ("layer", "first"):
            self._cache[key] = w
        return w

    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients | None:
        """An attached stack: the one rule's weights spread over the bank's ranks."""
        w = self.weights_at(bank, x).to(bank.A.dtype)  # (B, 1|T, k)
        return Coefficients(spread_weights(w, bank.owner))  # (B, 1|T, R)

    def fill(self, bank: LoRABank, x: Tensor, static: Tensor, owner: Tensor) -> Tensor:
        """A pool plan's coefficients ``static (B, 1, R)`` with each group's rows replaced by its
        rule's weights spread over the row's parts (``owner (B, R)``): ``(B, 1|T, R)``."""
        out = static
        for group, (_, rows) in enumerate(self.groups):
            w = self.weights_at(bank, x, group)  # (n, 1|T, k)
            index = rows.to(static.device) if rows is not None else torch.arange(static.shape[0])
            spread = spread_weights(w.to(static.dtype), owner.index_select(0, index.to(owner.device)))
            if spread.shape[1] != out.shape[1]:
                out = out.expand(-1, max(out.shape[1], spread.shape[1]), -1).clone()  # (B, T, R)
            elif out is static:
                out = out.clone()
            out[index.to(out.device)] = spread.to(out.device).expand(-1, out.shape[1], -1)
        return out
