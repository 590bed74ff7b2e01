"""Per-token and per-module coefficients for the rows of a batch that use a learned fusion.

A row using a LoRA-Flow fusion has its fusion's k LoRAs as its parts (weight 1); at each decoder
layer ``l`` the gate reads that row's residual stream ``x_l`` and gives ``w_l (T, k)``
(:func:`lorafuse.fusion.gate.gate_weights`), which scales each LoRA's ranks::

    c[b, t, j] = w_l[b, t, owner[b, j]]          (owner = which of the k LoRAs rank j belongs to)

A row using learned CAT weights gets ``softmax(logits_m)`` per module ``m``, the same for every
token. Other rows keep the plan's static coefficients. Pre-hooks on the decoder layers capture the
layer inputs; this is exactly what :class:`lorafuse.fusion.flow.LoRAFlow` does for one fusion, for
any mix of fusions in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorafuse.fusion.artefact import Fusion
from lorafuse.fusion.gate import gate_weights
from lorafuse.runtime.pool import PooledBank


def _spread(w: Tensor, owner: Tensor) -> Tensor:
    """``w (n, T, k)`` per LoRA → ``(n, T, R)`` per rank position (0 on padding)."""
    index = owner.clamp(min=0).unsqueeze(1).expand(-1, w.shape[1], -1)  # (n, T, R)
    return w.gather(-1, index) * (owner >= 0).unsqueeze(1).to(w.dtype)  # (n, T, R)


class FusionRows:
    """The :class:`~lorafuse.runtime.pool.CoefSource` of a batch: rows grouped by fusion."""

    def __init__(self, groups: Sequence[tuple[Fusion, Sequence[int]]], owner: Tensor) -> None:
        self.groups = [(fusion, torch.tensor(list(rows), dtype=torch.long)) for fusion, rows in groups]
        self.owner = owner  # (B, R)
        self._inputs: dict[int, Tensor] = {}
        self._layer_coef: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._module_coef: dict[str, Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._needs_layers = any(f.method == "lora-flow" for f, _ in self.groups)
        self._has_cat = any(f.method == "cat-weights" for f, _ in self.groups)

    def install(self, layers: nn.ModuleList | None) -> FusionRows:
        if self._needs_layers:
            if layers is None:
                raise ValueError("LoRA-Flow rows need the model's decoder layers")
            for index, layer in enumerate(layers):
                self._hooks.append(layer.register_forward_pre_hook(self._capture(index), with_kwargs=True))
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _capture(self, index: int) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]  # (B, T, hidden)
            self._layer_coef.pop(index, None)

        return capture

    def coef_for(self, bank: PooledBank, x: Tensor, static: Tensor) -> Tensor | None:
        layer = bank.layer_index
        key = bank.path
        if self._has_cat and key not in self._module_coef:
            self._module_coef[key] = self._cat(bank.path, static)
        if not self._needs_layers:
            return self._module_coef.get(key)
        base = self._module_coef.get(key, static)  # (B, 1, R): static or per-module CAT weights
        if layer is None:
            return base
        coef = base.expand(x.shape[0], x.shape[1], -1).clone()  # (B, T, R)
        for rows, spread in self._flow(bank, x):
            coef[rows] = spread.to(coef.dtype)
        return coef

    def _flow(self, bank: PooledBank, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(rows, coefficients (n, T, R))`` of every LoRA-Flow group at this bank's layer;
        computed once per layer and forward pass unless the gates are per module."""
        layer = bank.layer_index
        assert layer is not None
        if layer in self._layer_coef:
            return self._layer_coef[layer]
        out, per_module = [], False
        for fusion, rows in self.groups:
            if fusion.method != "lora-flow":
                continue
            gate = fusion.gate
            assert gate is not None
            per_module |= gate.granularity == "module"
            source = 0 if gate.granularity == "step" else layer
            if gate.granularity == "module":
                g = gate.module_paths.index(bank.path)
            else:
                g = 0 if gate.granularity == "step" else layer
            hidden = self._inputs[source].index_select(0, rows.to(x.device))  # (n, T, hidden)
            weight, bias = fusion.tensors["gate.weight"][g], fusion.tensors["gate.bias"][g]
            w = gate_weights(
                hidden,
                weight.to(hidden.device),
                bias.to(hidden.device),
                temperature=gate.temperature,
                bias_in_softmax=gate.bias_in_softmax,
            )  # (n, T, k)
            out.append((rows.to(x.device), _spread(w, self.owner[rows].to(x.device))))
        if not per_module:
            self._layer_coef[layer] = out
        return out

    def _cat(self, path: str, static: Tensor) -> Tensor:
        coef = static.clone()  # (B, 1, R)
        for fusion, rows in self.groups:
            if fusion.method != "cat-weights":
                continue
            index = fusion.module_paths.index(path) if path in fusion.module_paths else None
            if index is None:
                coef[rows] = 0.0
                continue
            w = torch.softmax(fusion.tensors["logits"][index].float(), dim=-1)  # (k,)
            w = w.expand(len(rows), 1, -1)  # (n, 1, k)
            coef[rows] = _spread(w, self.owner[rows]).to(coef.dtype)
        return coef
