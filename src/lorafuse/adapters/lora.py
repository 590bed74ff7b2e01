"""In-memory adapters: `LoRA` (low-rank factors per module) and `Delta` (dense ΔW per module).

A LoRA module adds ``ΔW = s · B A`` to a frozen linear map ``W0`` (Hu et al., 2021,
arXiv 2106.09685): ``h = W0 x + s · B (A x)``, with ``A`` of shape ``(r, in)``, ``B`` of shape
``(out, r)`` and ``s = α / r`` (or ``α / √r`` with rsLoRA). Module paths are the names of the
adapted modules inside the base model as PEFT sees it (``model.layers.0.self_attn.q_proj`` for a
``LlamaForCausalLM``). This file is pure tensor maths: no transformers; the PEFT folder format
lives in :mod:`lorafuse.adapters.peft_format`, which :meth:`LoRA.save` / :meth:`LoRA.load` call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lorafuse._checks import InvalidValueError

if TYPE_CHECKING:
    from lorafuse._io import OutputInputs


@dataclass(frozen=True)
class LoRAModule:
    """Factors of one adapted module: ``ΔW = scale · B @ A``."""

    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"LoRA factors must be matrices, got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA rank mismatch: A is {tuple(self.A.shape)} (r×in) but B is "
                f"{tuple(self.B.shape)} (out×r)"
            )
        try:
            finite = math.isfinite(float(self.scale))
        except (TypeError, ValueError, RuntimeError):
            finite = False
        if not finite:
            raise InvalidValueError(
                f"LoRA scale must be a finite number, got {self.scale!r}; a NaN or infinite scale "
                "would turn every output of the adapted layer into NaN"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``ΔW = s · B A`` of shape ``(out, in)``. Only for small modules and tests."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))  # (out, in)

    def fro_norm(self) -> float:
        """``‖s · B A‖_F`` in factored form: ``‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ)``, never forming ``ΔW``."""
        a = self.A.double()
        b = self.B.double()
        gram = (b.T @ b) * (a @ a.T)  # (r, r)
        return abs(self.scale) * math.sqrt(max(gram.sum().item(), 0.0))


@dataclass
class LoRA:
    """A LoRA adapter: one :class:`LoRAModule` per adapted module path.

    ``base_model`` is the base model name or path recorded by whoever trained the adapter;
    ``metadata`` keeps the source configuration fields lorafuse does not interpret (task type,
    revision, ...) so that they survive a load/save round trip.
    """

    modules: dict[str, LoRAModule]
    base_model: str | None = None
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError(f"LoRA {self.name!r} has no modules")

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, path: str) -> LoRAModule:
        return self.modules[path]

    @property
    def ranks(self) -> dict[str, int]:
        return {path: m.rank for path, m in self.modules.items()}

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    @property
    def module_kinds(self) -> list[str]:
        """Sorted distinct last path components (``q_proj``, ``c_attn``, ...)."""
        return sorted({module_kind(p) for p in self.modules})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoRA:
        """A copy with every factor moved to ``dtype``/``device``."""
        modules = {
            p: LoRAModule(m.A.to(device=device, dtype=dtype), m.B.to(device=device, dtype=dtype), m.scale)
            for p, m in self.modules.items()
        }
        return LoRA(modules, self.base_model, self.name, dict(self.metadata))

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        dtype: torch.dtype | None = None,
        extra: dict[str, Any] | None = None,
        inputs: OutputInputs = (),
    ) -> Path:
        """Write a PEFT folder atomically (:func:`~lorafuse.adapters.peft_format.save_lora`).

        An existing non-empty folder is replaced only with ``overwrite``; the folder this LoRA was
        loaded from (``metadata["source"]``) counts among ``inputs``, so it is never written over.
        """
        from lorafuse.adapters.peft_format import save_lora

        own = self.metadata.get("source")
        sources = [*([("the LoRA's source", own)] if isinstance(own, str) else []), *_as_list(inputs)]
        return save_lora(self, path, overwrite=overwrite, dtype=dtype, extra=extra, inputs=sources)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, allow_pickle: bool = False, name: str | None = None
    ) -> LoRA:
        """Read a PEFT folder (:func:`~lorafuse.adapters.peft_format.load_lora`)."""
        from lorafuse.adapters.peft_format import load_lora

        return load_lora(path, allow_pickle=allow_pickle, name=name)


@dataclass
class Delta:
    """Dense fine-tuning deltas ``ΔW = W_ft − W_base``, one ``(out, in)`` matrix per module."""

    weights: dict[str, Tensor]
    base_model: str | None = None
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, path: str) -> Tensor:
        return self.weights[path]

    @property
    def num_params(self) -> int:
        return sum(w.numel() for w in self.weights.values())

    @classmethod
    def from_lora(cls, lora: LoRA, dtype: torch.dtype = torch.float32) -> Delta:
        """Dense ``s · B A`` for every module of ``lora`` (small models and tests only)."""
        return cls({p: m.delta(dtype) for p, m in lora.modules.items()}, lora.base_model, lora.name)

    @classmethod
    def from_state_dicts(
        cls, base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], keys: list[str]
    ) -> Delta:
        """``W_ft − W_base`` for the given weight keys (``module.weight`` names, suffix dropped)."""
        weights: dict[str, Tensor] = {}
        for key in keys:
            if base[key].shape != finetuned[key].shape:
                raise ValueError(
                    f"{key}: base has shape {tuple(base[key].shape)}, fine-tuned has "
                    f"{tuple(finetuned[key].shape)}"
                )
            path = key.removesuffix(".weight")
            weights[path] = finetuned[key].float() - base[key].float()  # (out, in)
        return cls(weights)


def _as_list(inputs: OutputInputs) -> list[Any]:
    """``inputs`` (paths, ``(label, path)`` pairs or a ``{label: path}`` mapping) as one list."""
    if isinstance(inputs, str | os.PathLike):
        return [inputs]
    return list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)


def module_kind(path: str) -> str:
    """The last component of a module path: ``model.layers.3.mlp.up_proj`` → ``up_proj``."""
    return path.rsplit(".", 1)[-1]
