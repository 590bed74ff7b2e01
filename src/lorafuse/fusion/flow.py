"""LoRA-Flow as a weight source of the bank: gates read each decoder layer's input, per token.

A forward pre-hook on every decoder layer captures the residual stream entering the layer
(before its input norm) and computes that layer's weights ``w_l (B, T, k)`` at once; every bank of
the layer then reads them (:meth:`LoRAFlow.weights_for`). During generation each step's forward
sees only the new tokens, so the weights are recomputed per decoding step and cached positions
keep theirs: the gates work with the KV cache unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorafuse.errors import LorafuseError
from lorafuse.fusion.gate import FlowGates, GateConfig
from lorafuse.runtime import AttachedBank, LoRABank

_LAYERS_RE = re.compile(r"^(.*)\.(\d+)\.")


def decoder_layers(model: nn.Module, bank_paths: list[str]) -> nn.ModuleList:
    """The list of decoder layers that the banks' paths index (``model.layers`` for Llama)."""
    prefixes = {m.group(1) for p in bank_paths if (m := _LAYERS_RE.match(p))}
    unindexed = [p for p in bank_paths if not _LAYERS_RE.match(p)]
    if unindexed or len(prefixes) != 1:
        raise LorafuseError(
            "LoRA-Flow gates need every adapted module inside one list of numbered decoder layers "
            f"(like model.layers.<i>.…); found layer lists {sorted(prefixes)} and modules outside "
            f"any layer {unindexed[:3]}"
        )
    layers = model.get_submodule(prefixes.pop())
    if not isinstance(layers, nn.ModuleList):
        raise LorafuseError(f"{type(layers).__name__} at the decoder-layer path is not an nn.ModuleList")
    return layers


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not size:
        raise LorafuseError("cannot tell the model's hidden size (config.hidden_size)")
    return int(size)


class LoRAFlow(nn.Module):
    """Per-token, per-layer fusion weights from :class:`FlowGates`; a bank ``WeightSource``.

    ``record`` (a list) collects ``(layer, weights (B, T, k))`` of every forward pass, detached,
    for :mod:`lorafuse.fusion.explain`.
    """

    def __init__(self, gates: FlowGates) -> None:
        super().__init__()
        self.gates = gates
        self.config: GateConfig = gates.config
        self._inputs: dict[int, Tensor] = {}
        self._weights: dict[int, Tensor] = {}
        self._module_index = {p: i for i, p in enumerate(self.config.module_paths)}
        self._hooks: list[RemovableHandle] = []
        self.record: list[tuple[int, Tensor]] | None = None

    def install(self, handle: AttachedBank) -> LoRAFlow:
        """Hook the decoder layers of ``handle.model`` and feed every bank from these gates."""
        if handle.k != self.config.k:
            raise LorafuseError(f"the gates fuse k={self.config.k} LoRAs but the bank holds {handle.k}")
        self.remove()
        layers = decoder_layers(handle.model, list(handle.banks))
        if len(layers) != self.config.num_layers and self.config.granularity != "step":
            raise LorafuseError(
                f"the gates were made for {self.config.num_layers} layers, the model has {len(layers)}"
            )
        missing = set(handle.banks) - set(self._module_index)
        if self.config.granularity == "module" and missing:
            raise LorafuseError(f"no module gate for {sorted(missing)[:3]}")
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))
        handle.set_source(self)
        return self

    def remove(self) -> None:
        """Remove the layer hooks (the bank keeps this source until another is set)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, index: int) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, hidden)
            granularity = self.config.granularity
            if granularity == "step":
                if index == 0:
                    self._weights[0] = self.gates(x, 0)  # (B, T, k), shared by all layers
                    self._note(0, self._weights[0])
                return
            if granularity == "module":
                self._inputs[index] = x
                return
            self._weights[index] = self.gates(x, index)  # (B, T, k)
            self._note(index, self._weights[index])

        return capture

    def _note(self, layer: int, weights: Tensor) -> None:
        if self.record is not None:
            self.record.append((layer, weights.detach().float().cpu()))

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        layer = bank.layer_index
        assert layer is not None  # checked by decoder_layers
        granularity = self.config.granularity
        if granularity == "module":
            w = self.gates(self._inputs[layer], self._module_index[bank.path])  # (B, T, k)
        else:
            w = self._weights[0 if granularity == "step" else layer]  # (B, T, k)
        if w.shape[:2] != x.shape[:2]:
            raise LorafuseError(
                f"{bank.path}: gate weights {tuple(w.shape)} do not match the layer input "
                f"{tuple(x.shape)}; the model must call its decoder layers with (B, T, hidden)"
            )
        return w.to(bank.A.dtype)


def flow_for(handle: AttachedBank, **options: Any) -> LoRAFlow:
    """New zero-initialised gates for the bank of ``handle`` (options: :class:`GateConfig` fields)."""
    layers = decoder_layers(handle.model, list(handle.banks))
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
