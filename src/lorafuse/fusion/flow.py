"""LoRA-Flow's weight rule: gates read each decoder layer's input and weight the bank per token.

The gate of layer ``l`` reads the residual stream entering the layer (before its input norm) and
gives that layer's weights ``w_l (B, T, k)`` (:mod:`lorafuse.fusion.gate`); every bank of the
layer reads them. The hooks, the per-layer cache and the spreading over ranks are
:class:`~lorafuse.runtime.LayerInputSource`'s; this module holds only the rule. During generation
each step's forward sees only the new tokens, so the weights are recomputed per decoding step and
cached positions keep theirs: the gates work with the KV cache unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse._layers import find_decoder_layers
from lorafuse.errors import LorafuseError
from lorafuse.fusion.gate import FlowGates, GateConfig
from lorafuse.fusion.weighting import Shapes, Weighting
from lorafuse.runtime import AttachedBank, ForwardCall, LayerInputSource, Reads


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not size:
        raise LorafuseError("cannot tell the model's hidden size (config.hidden_size)")
    return int(size)


class LoRAFlow(nn.Module):
    """LoRA-Flow's weight rule over :class:`FlowGates` (a :class:`~lorafuse.runtime.WeightRule`).

    ``granularity="layer"`` reads each layer's input with that layer's gate, ``"step"`` reads the
    first layer's input with one gate for all layers, ``"module"`` reads each layer's input with
    one gate per adapted module. ``record`` (a list) collects ``(layer, weights (B, T, k))`` of
    every forward pass, detached, for :mod:`lorafuse.fusion.explain`.
    """

    def __init__(self, gates: FlowGates) -> None:
        super().__init__()
        self.gates = gates
        self.config: GateConfig = gates.config
        self._module_index = {p: i for i, p in enumerate(self.config.module_paths)}
        self.record: list[tuple[int, Tensor]] | None = None
        self.source: LayerInputSource | None = None

    @property
    def reads(self) -> Reads:
        return "first" if self.config.granularity == "step" else "layer"

    @property
    def per_module(self) -> bool:
        return self.config.granularity == "module"

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``w = softmax(W_g x / T) + b_g`` for the gate ``g`` of this layer, module or step."""
        granularity = self.config.granularity
        if granularity == "module":
            return self.gates(hidden, self._module_index[path])  # (n, T, k)
        assert layer is not None
        gate = 0 if granularity == "step" else layer
        w = self.gates(hidden, gate)  # (n, T, k)
        if self.record is not None:
            self.record.append((gate, w.detach().float().cpu()))
        return w

    def install(self, handle: AttachedBank) -> LoRAFlow:
        """Hook the decoder layers of ``handle.model`` and feed every bank from these gates."""
        if handle.k != self.config.k:
            raise LorafuseError(f"the gates fuse k={self.config.k} LoRAs but the bank holds {handle.k}")
        self.remove()
        source = LayerInputSource(handle.model, self)
        outside = [p for p, bank in handle.banks.items() if source.layer_of(bank) is None]
        if outside:
            source.remove()
            raise LorafuseError(
                "LoRA-Flow gates need every adapted module inside one list of numbered decoder layers "
                f"(like model.layers.<i>.…); found modules outside the decoder layers {outside[:3]}"
            )
        if source.num_layers != self.config.num_layers and self.config.granularity != "step":
            source.remove()
            raise LorafuseError(
                f"the gates were made for {self.config.num_layers} layers, the model has {source.num_layers}"
            )
        missing = set(handle.banks) - set(self._module_index)
        if self.config.granularity == "module" and missing:
            source.remove()
            raise LorafuseError(f"no module gate for {sorted(missing)[:3]}")
        self.source = source
        handle.set_source(source)
        return self

    def remove(self) -> None:
        """Remove the layer hooks (the bank keeps this source until another is set)."""
        if self.source is not None:
            self.source.remove()
            self.source = None


def flow_for(handle: AttachedBank, **options: Any) -> LoRAFlow:
    """New zero-initialised gates for the bank of ``handle`` (options: :class:`GateConfig` fields)."""
    layers = find_decoder_layers(handle.model)[1]
    config = GateConfig(
        k=handle.k,
        hidden_size=hidden_size_of(handle.model),
        num_layers=len(layers),
        module_paths=tuple(handle.banks) if options.get("granularity") == "module" else (),
        **options,
    )
    device = next(iter(handle.banks.values())).A.device
    return LoRAFlow(FlowGates(config).to(device)).install(handle)


@torch.no_grad()
def mean_weights(flow: LoRAFlow) -> Tensor:
    """Mean recorded weights per layer ``(layers, k)`` over every recorded token (needs ``record``)."""
    if not flow.record:
        raise LorafuseError("nothing recorded: set flow.record = [] before the forward pass")
    by_layer: dict[int, list[Tensor]] = {}
    for layer, w in flow.record:
        by_layer.setdefault(layer, []).append(w.reshape(-1, w.shape[-1]))
    return torch.stack([torch.cat(by_layer[i]).mean(0) for i in sorted(by_layer)])


class FlowWeighting(Weighting):
    """The stored ``lora-flow`` kind: the gates ``gate.weight (G, k, hidden)``, ``gate.bias (G, k)``."""

    name = "lora-flow"
    paper = "Wang et al. 2024, LoRA-Flow, arXiv:2402.11455"
    summary = "per-token weights from gates on each decoder layer's input"
    gated = True

    def shapes(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> Shapes:
        assert gate is not None
        return {
            "gate.weight": (gate.num_gates, gate.k, gate.hidden_size),
            "gate.bias": (gate.num_gates, gate.k),
        }

    def check(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> str | None:
        if gate is None:
            return "gate: missing or null, but a lora-flow fusion needs its gate settings"
        if gate.k != k:
            return f"gate.k is {gate.k} but the fusion lists {k} LoRAs"
        if gate.start is not None and not -gate.k <= gate.start < gate.k:
            return f"gate.start is {gate.start}; it must index one of the {gate.k} LoRAs"
        return None

    def build_rule(
        self, tensors: Mapping[str, Tensor], gate: GateConfig | None, module_paths: Sequence[str]
    ) -> LoRAFlow:
        assert gate is not None
        gates = FlowGates(gate)
        with torch.no_grad():
            gates.weight.copy_(tensors["gate.weight"])
            gates.bias.copy_(tensors["gate.bias"])
        return LoRAFlow(gates)

    def install(self, rule: nn.Module | None, tensors: Mapping[str, Tensor], handle: AttachedBank) -> None:
        assert isinstance(rule, LoRAFlow)
        rule.install(handle)
