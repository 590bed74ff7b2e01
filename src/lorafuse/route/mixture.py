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

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints
from torch import Tensor, nn

from lorafuse._checks import PositiveInt, StrictFiniteFloat, StrictPositiveFloat, finite_or_none, parse_model
from lorafuse._io import (
    OutputInputs,
    atomic_output_dir,
    combine_inputs,
    read_json_file,
    read_safetensors,
    record_path,
    resolve_recorded_path,
    versions,
    write_json,
    write_safetensors,
)
from lorafuse._layers import find_decoder_layers
from lorafuse.adapters import LoRA, LoRAModule, load_lora, save_lora
from lorafuse.adapters.validate import linear_shape
from lorafuse.errors import LorafuseError
from lorafuse.route.router import ROUTINGS, Router, RouterSource
from lorafuse.runtime import AttachedBank, attach, detach

FORMAT = "lorafuse-mixture"
VERSION = 1
MIXTURE_JSON = "mixture.json"
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
    layers = find_decoder_layers(model)[1]
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
            config.router,
            len(find_decoder_layers(model)[1]),
            hidden,
            config.experts,
            config.top_k,
            seed=config.seed,
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
        """The training loss of this router kind, for :func:`lorafuse.train.loop.train_loop`."""
        generator = generator or torch.Generator().manual_seed(self.config.seed)
        return ROUTINGS[self.config.router].training_loss(self.source, self.config, generator)

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
            "base_model": record_path(self.base_model) if self.base_model else self.base_model,
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
            meta = finite_or_none({**self.describe(), **(extra or {})})
            if isinstance(meta.get("tokenizer"), str):
                meta["tokenizer"] = record_path(meta["tokenizer"])
            write_json(meta, tmp / MIXTURE_JSON)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> Mixture:
        """Attach a saved mixture to ``model`` (frozen, ready for ``generate``).

        Every problem of the folder is one :class:`LorafuseError` naming the file and field (see
        :func:`read_mixture`); the model is untouched when loading fails.
        """
        folder = Path(path)
        meta, config, weight = read_mixture(folder)
        router = Router(config.router, meta["num_layers"], meta["hidden_size"], config.experts, config.top_k)
        with torch.no_grad():
            router.weight.copy_(weight)
        experts = []
        for i in range(config.experts):
            expert = load_lora(folder / "experts" / f"e{i}")
            wrong = sorted(p for p, m in expert.modules.items() if m.rank != config.rank)
            if wrong:
                raise LorafuseError(
                    f"{folder / 'experts' / f'e{i}'}: {wrong[0]} has rank {expert[wrong[0]].rank} but "
                    f"{MIXTURE_JSON} says config.rank={config.rank}"
                )
            experts.append(expert)
        mixture = cls(model, experts, router, config, meta.get("base_model"))
        mixture.freeze()
        return mixture

    def remove(self) -> nn.Module:
        """Remove hooks and banks: the model is the untouched base again."""
        self.source.remove()
        return detach(self.model)


class _MixtureSettings(BaseModel):
    """``mixture.json``'s ``config`` (the fields of :class:`MixtureConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    router: Annotated[str, StringConstraints(strict=True)] = "remix"
    experts: PositiveInt = 8
    top_k: PositiveInt = 2
    rank: PositiveInt = 16
    alpha: StrictPositiveFloat = 32.0
    targets: Annotated[
        list[Annotated[str, StringConstraints(strict=True, min_length=1)]], Field(min_length=1)
    ]
    samples: PositiveInt = 4
    balance: Annotated[StrictFiniteFloat, Field(ge=0)] = 0.01
    seed: StrictInt = 0
    extra: dict[str, Any] = {}


class _MixtureMeta(BaseModel):
    """What :meth:`Mixture.load` needs from ``mixture.json`` (format and version checked first)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    config: _MixtureSettings
    num_layers: PositiveInt
    hidden_size: PositiveInt
    base_model: str | None = None


def read_mixture_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``mixture.json`` of a mixture folder (recorded paths resolved from it).

    Raises one :class:`LorafuseError` naming the file and field for a missing file, bad JSON,
    another format or version, wrong types, NaN/inf, ``top_k`` beyond the experts, an unknown
    router kind.
    """
    return _read_meta(Path(path))[0]


def _read_meta(folder: Path) -> tuple[dict[str, Any], _MixtureMeta]:
    meta_path = folder / MIXTURE_JSON
    raw = read_json_file(meta_path, LorafuseError, what="mixture description")
    if not isinstance(raw, dict):
        raise LorafuseError(f"{meta_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise LorafuseError(
            f"{folder}: not a lorafuse mixture of version {VERSION} "
            f"(format {raw.get('format')!r}, version {raw.get('version')!r})"
        )
    meta = parse_model(_MixtureMeta, raw, str(meta_path), error=LorafuseError)
    settings = meta.config
    if settings.router not in ROUTINGS:
        raise LorafuseError(f"{meta_path}: config.router is {settings.router!r}; one of {sorted(ROUTINGS)}")
    if settings.top_k > settings.experts:
        raise LorafuseError(
            f"{meta_path}: config.top_k is {settings.top_k} but there are {settings.experts} experts"
        )
    described = dict(raw)
    for key in ("base_model", "tokenizer"):
        if isinstance(described.get(key), str):
            described[key] = resolve_recorded_path(described[key], folder)
    return described, meta


def read_mixture(folder: Path) -> tuple[dict[str, Any], MixtureConfig, Tensor]:
    """``mixture.json`` (validated), its :class:`MixtureConfig` and the router weight ``(L, n, H)``,
    checked against the description and for NaN/inf before any module is built."""
    meta, parsed = _read_meta(folder)
    settings = parsed.config
    config = MixtureConfig(**{**settings.model_dump(), "targets": tuple(settings.targets)})
    weights_path = folder / "router.safetensors"
    tensors = read_safetensors(weights_path, require_finite=True)
    expected = (meta["num_layers"], config.experts, meta["hidden_size"])
    got = tuple(tensors["weight"].shape) if "weight" in tensors else "missing"
    if got != expected:
        raise LorafuseError(f"{weights_path}: weight is {got}, expected {expected} from {MIXTURE_JSON}")
    return meta, config, tensors["weight"]
