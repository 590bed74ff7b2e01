"""A mixture of LoRA experts on a frozen base: n new experts in one bank, routed per token per layer.

The n experts (rank r each, on the target modules of every decoder layer) are attached as one
:class:`~lorafuse.runtime.LoRABank` per module whose stacked factors are trainable; a
:class:`~lorafuse.route.router.Router` (kind ``softmax`` or ``remix``) weights them per token.
The base never changes. Saved as a folder (written atomically)::

    mixture.json            format, version, router kind, n, k, rank, alpha, targets, base, training
    router.safetensors      weight (L, n, H)
    experts/e<i>/           one PEFT LoRA per expert (loads in PeftModel unchanged)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse._io import (
    OutputInputs,
    atomic_output_dir,
    combine_inputs,
    read_safetensors,
    versions,
    write_json,
    write_safetensors,
)
from lorafuse.adapters import LoRA, LoRAModule, load_lora, save_lora
from lorafuse.adapters.validate import linear_shape
from lorafuse.errors import LorafuseError
from lorafuse.route.remix import remix_loss
from lorafuse.route.router import Router, RouterSource, decoder_layers
from lorafuse.route.softmax import softmax_loss
from lorafuse.runtime import AttachedBank, attach, detach

FORMAT = "lorafuse-mixture"
VERSION = 1
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MixtureConfig:
    """What to build: ``experts`` LoRAs of rank ``rank`` on ``targets``, routed top-``top_k``."""

    router: str = "remix"
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    samples: int = 4  # ReMix: M sampled selections per example
    balance: float = 0.01  # softmax: weight of the load-balancing loss
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def new_experts(model: nn.Module, config: MixtureConfig) -> list[LoRA]:
    """``n`` fresh LoRAs on every target module of the decoder layers: ``A ~ U(±1/√in)``, ``B = 0``."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    paths = [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".")
        and name.rsplit(".", 1)[-1] in config.targets
        and linear_shape(module) is not None
    ]
    if not paths:
        raise LorafuseError(f"no module of {type(model).__name__} matches the targets {list(config.targets)}")
    generator = torch.Generator().manual_seed(config.seed)
    experts = []
    for i in range(config.experts):
        modules = {}
        for path in paths:
            shape = linear_shape(model.get_submodule(path))
            assert shape is not None
            bound = 1.0 / math.sqrt(shape.in_features)
            a = (torch.rand(config.rank, shape.in_features, generator=generator) * 2 - 1) * bound  # (r, in)
            modules[path] = LoRAModule(
                a, torch.zeros(shape.out_features, config.rank), config.alpha / config.rank
            )
        experts.append(LoRA(modules, name=f"e{i}"))
    return experts


class Mixture:
    """Experts attached as one bank, a router and the hooks feeding it; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        experts: list[LoRA],
        router: Router,
        config: MixtureConfig,
        base_model: str | None,
    ) -> None:
        self.model, self.router, self.config, self.base_model = model, router, config, base_model
        self.bank: AttachedBank = attach(model, experts)
        self.source = RouterSource(router, model)
        self.bank.set_source(self.source)
        self.scale = config.alpha / config.rank

    @classmethod
    def create(cls, model: nn.Module, config: MixtureConfig, base_model: str | None = None) -> Mixture:
        hidden = int(model.config.hidden_size)
        router = Router(
            config.router, len(decoder_layers(model)), hidden, config.experts, config.top_k, seed=config.seed
        )
        return cls(model, new_experts(model, config), router, config, base_model)

    def parameters(self) -> list[Tensor]:
        """The trainable tensors: the router and every bank's stacked expert factors."""
        tensors: list[Tensor] = list(self.router.parameters())
        for bank in self.bank.banks.values():
            tensors += [bank.A.requires_grad_(True), bank.B.requires_grad_(True)]
        return tensors

    def freeze(self) -> None:
        for bank in self.bank.banks.values():
            bank.A.requires_grad_(False)
            bank.B.requires_grad_(False)
        self.router.requires_grad_(False)

    def loss_fn(
        self, generator: torch.Generator | None = None
    ) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
        """The training loss of this router kind, for :func:`lorafuse.fuse.loop.train_loop`."""
        if self.config.router == "remix":
            return remix_loss(
                self.source, self.config.samples, generator or torch.Generator().manual_seed(self.config.seed)
            )
        return softmax_loss(self.source, self.config.balance)

    def experts(self) -> list[LoRA]:
        """The experts as separate LoRAs (scale unfolded from the stacked ``A``)."""
        r, out = self.config.rank, []
        for i in range(self.config.experts):
            modules = {
                path: LoRAModule(
                    bank.A[i * r : (i + 1) * r].detach().clone() / self.scale,
                    bank.B[:, i * r : (i + 1) * r].detach().clone(),
                    self.scale,
                )
                for path, bank in self.bank.banks.items()
            }
            out.append(LoRA(modules, base_model=self.base_model, name=f"e{i}"))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": {**asdict(self.config), "targets": list(self.config.targets)},
            "num_layers": self.router.num_layers,
            "hidden_size": int(self.router.weight.shape[-1]),
            "base_model": self.base_model,
            "versions": versions(),
        }

    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, Any] | None = None,
        *,
        overwrite: bool = True,
        inputs: OutputInputs = (),
    ) -> Path:
        """Write the mixture folder atomically (see the module docstring).

        ``path`` must not be, contain or lie inside the base model, the tokenizer recorded in
        ``extra``, nor any of ``inputs`` (training data).
        """
        known = [self.base_model, (extra or {}).get("tokenizer")]
        with atomic_output_dir(path, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
            write_safetensors({"weight": self.router.weight}, tmp / "router.safetensors")
            for i, expert in enumerate(self.experts()):
                save_lora(expert, tmp / "experts" / f"e{i}")
            write_json({**self.describe(), **(extra or {})}, tmp / "mixture.json")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> Mixture:
        """Attach a saved mixture to ``model`` (frozen, ready for ``generate``)."""
        folder = Path(path)
        try:
            meta = json.loads((folder / "mixture.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LorafuseError(
                f"{folder / 'mixture.json'}: cannot read the mixture description: {exc}"
            ) from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise LorafuseError(
                f"{folder}: not a lorafuse mixture of version {VERSION} "
                f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
            )
        settings = dict(meta["config"])
        settings["targets"] = tuple(settings["targets"])
        config = MixtureConfig(**settings)
        weight = read_safetensors(folder / "router.safetensors")["weight"]
        expected = (meta["num_layers"], config.experts, meta["hidden_size"])
        if tuple(weight.shape) != expected:
            raise LorafuseError(
                f"{folder / 'router.safetensors'}: weight is {tuple(weight.shape)}, expected {expected}"
            )
        router = Router(config.router, meta["num_layers"], meta["hidden_size"], config.experts, config.top_k)
        with torch.no_grad():
            router.weight.copy_(weight)
        experts = [load_lora(folder / "experts" / f"e{i}") for i in range(config.experts)]
        mixture = cls(model, experts, router, config, meta.get("base_model"))
        mixture.freeze()
        return mixture

    def remove(self) -> nn.Module:
        """Remove hooks and banks: the model is the untouched base again."""
        self.source.remove()
        return detach(self.model)
