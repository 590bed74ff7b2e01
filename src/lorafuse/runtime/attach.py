"""Attach a bank of LoRAs to a HuggingFace model, weight it, and detach it bit for bit.

``attach`` replaces every adapted ``nn.Linear`` (or GPT-2 ``Conv1D``) with a :class:`LoRABank`
that holds the original layer as ``base``; ``detach`` puts the original layer objects back, so
the model is exactly what it was (same objects, same tensors). One forward pass of the base
serves all k LoRAs at any weighting.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorafuse.adapters.lora import LoRA
from lorafuse.adapters.validate import check_compatible, linear_shape
from lorafuse.errors import LorafuseError
from lorafuse.runtime.bank import CoefficientSource, LoRABank, StaticWeights, WeightSource
from lorafuse.runtime.functional import stack_factors

WeightsLike = Tensor | Sequence[float] | Mapping[str, float]


@dataclass
class AttachedBank:
    """Handle on the banks attached to a model: set weights, swap weight sources, detach."""

    model: nn.Module
    names: list[str]
    banks: dict[str, LoRABank]
    static: StaticWeights

    @property
    def k(self) -> int:
        return len(self.names)

    def weight_vector(self, weights: WeightsLike) -> Tensor:
        """``{"math": 0.7, "zh": 0.5}`` → a ``(k,)`` tensor (unnamed LoRAs get 0); tensors pass."""
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise KeyError(f"unknown LoRA name(s) {unknown}; the bank holds {self.names}")
            return torch.tensor([float(weights.get(n, 0.0)) for n in self.names])
        return torch.as_tensor(weights, dtype=torch.float32)

    def set_weights(self, weights: WeightsLike) -> None:
        """Static weights `(k,)`, per row `(batch, k)`, per token `(batch, seq, k)`, or by name."""
        self.static.set(self.weight_vector(weights))
        self.set_source(self.static)

    def set_source(self, source: CoefficientSource | WeightSource) -> None:
        """Feed every bank from ``source`` (LoRA-Flow gates, routers, ...)."""
        for bank in self.banks.values():
            bank.set_source(source)

    @contextmanager
    def weights(self, weights: WeightsLike) -> Iterator[None]:
        """Use ``weights`` inside the ``with`` block, then restore the previous ones."""
        previous_sources = {p: b.source for p, b in self.banks.items()}
        previous = self.static.weights
        self.set_weights(weights)
        try:
            yield
        finally:
            self.static.set(previous)
            for path, bank in self.banks.items():
                bank.set_source(previous_sources[path])

    def detach(self) -> nn.Module:
        """Restore the original layers (see :func:`detach`)."""
        return detach(self.model)


def _named(loras: Sequence[LoRA] | Mapping[str, LoRA]) -> tuple[list[str], list[LoRA]]:
    if isinstance(loras, LoRA):
        loras = [loras]
    if isinstance(loras, Mapping):
        return list(loras), list(loras.values())
    names: list[str] = []
    for i, lora in enumerate(loras):
        name = lora.name or f"lora{i}"
        names.append(name if name not in names else f"{name}#{i}")
    return names, list(loras)


def attach(
    model: nn.Module,
    loras: LoRA | Sequence[LoRA] | Mapping[str, LoRA],
    weights: WeightsLike | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> AttachedBank:
    """Wrap every layer adapted by any of ``loras`` with one :class:`LoRABank`.

    Args:
        model: a HuggingFace model (or any ``nn.Module`` whose layer paths the LoRAs name).
        loras: the bank, as a list (names from ``LoRA.name``) or a ``{name: LoRA}`` mapping.
        weights: initial weights ``(k,)``, ``(batch, k)``, ``(batch, seq, k)`` or ``{name: w}``;
            default all ones (every LoRA at full strength, like PEFT with all adapters active).
        dtype: dtype of the stacked factors; default the dtype of each base layer's weight.
            ``torch.float32`` computes the LoRA path in fp32 for bf16/fp16 models, like PEFT.

    Layers adapted by only some LoRAs get zero rank for the others. Raises
    :class:`~lorafuse.errors.CompatibilityError` naming every module that does not fit.
    """
    names, lora_list = _named(loras)
    if not lora_list:
        raise ValueError("attach needs at least one LoRA")
    if any(isinstance(m, LoRABank) for m in model.modules()):
        raise LorafuseError("the model already has a LoRA bank attached; call detach(model) first")
    for name, lora in zip(names, lora_list, strict=True):
        check_compatible(lora, model, source=lora.metadata.get("source") or name)

    k = len(lora_list)
    static = StaticWeights(torch.ones(k), k)
    modules = dict(model.named_modules())
    wanted = set().union(*(lora.modules for lora in lora_list))
    banks: dict[str, LoRABank] = {}
    for path in (p for p in modules if p in wanted):  # model order, deterministic
        base = modules[path]
        shape = linear_shape(base)
        assert shape is not None  # checked by check_compatible
        factors = [
            (lo.modules[path].A, lo.modules[path].B, lo.modules[path].scale) if path in lo.modules else None
            for lo in lora_list
        ]
        a, b, ranks = stack_factors(factors, shape.in_features, shape.out_features)
        weight = base.weight
        target_dtype = dtype or weight.dtype
        bank = LoRABank(
            base,
            a.to(device=weight.device, dtype=target_dtype),  # (R, in)
            b.to(device=weight.device, dtype=target_dtype),  # (out, R)
            path,
            static,
            ranks=ranks,
        )
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, bank)
        banks[path] = bank
    handle = AttachedBank(model, names, banks, static)
    if weights is not None:
        handle.set_weights(weights)
    return handle


def detach(model: nn.Module) -> nn.Module:
    """Put back every original layer a bank wraps: the model is exactly as before ``attach``."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRABank):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.base)
    return model


def attached_banks(model: nn.Module) -> dict[str, LoRABank]:
    """The banks currently attached to ``model``, by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRABank)}
