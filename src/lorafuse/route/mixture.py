"""A mixture of LoRA experts on a frozen base: n new experts in one bank, routed per token per layer.

The n experts (rank r each, on the target modules of every decoder layer) are attached as one
:class:`~lorafuse.runtime.LoRABank` per module whose stacked factors are trainable; a
:class:`~lorafuse.route.router.Router` (kind ``softmax`` or ``remix``) weights them per token.
The base never changes. Saved as a folder (written atomically, artefact format
``lorafuse-mixture``)::

    mixture.json            format, version, config (router kind, n, k, rank, alpha, targets, ...),
                            num_layers, hidden_size, base_model, versions, and beside them the
                            caller's record (tokenizer, training settings: :attr:`Mixture.info`)
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

from lorafuse._artefact import Format, artefact_dir, read_header, register_format, write_header
from lorafuse._checks import (
    InvalidValueError,
    PositiveInt,
    StrictFiniteFloat,
    StrictPositiveFloat,
    finite_or_none,
    parse_model,
)
from lorafuse._io import (
    OutputInputs,
    combine_inputs,
    read_safetensors,
    record_path,
    resolve_recorded_path,
    write_safetensors,
)
from lorafuse._layers import find_decoder_layers
from lorafuse.adapters import LoRA, LoRAModule, load_lora, save_lora
from lorafuse.adapters.validate import linear_shape
from lorafuse.errors import ArtefactError, LorafuseError
from lorafuse.route.router import ROUTINGS, Router, RouterSource
from lorafuse.runtime import AttachedBank, attach, detach

FORMAT = "lorafuse-mixture"
VERSION = 1
MIXTURE_JSON = "mixture.json"
_FIELDS = ("format", "version", "config", "num_layers", "hidden_size", "base_model", "versions")


MIXTURE_FORMAT = register_format(
    Format(
        kind=FORMAT,
        version=VERSION,
        header=MIXTURE_JSON,
        noun="mixture",
        error=ArtefactError,
    )
)
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
        self.info: dict[str, Any] = {}  # the record saved beside the header (tokenizer, training)

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

    def describe(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The header fields of ``mixture.json``, then the record (:attr:`info` updated with ``extra``).

        A record key naming one of the header's own fields is refused (it would shadow it).
        """
        info = finite_or_none({**self.info, **(extra or {})})
        clash = sorted(set(info) & set(_FIELDS))
        if clash:
            raise InvalidValueError(
                f"the mixture's record {clash} would replace the header's own fields; rename those keys"
            )
        if isinstance(info.get("tokenizer"), str):
            info["tokenizer"] = record_path(info["tokenizer"])
        return {
            "config": {**asdict(self.config), "targets": list(self.config.targets)},
            "num_layers": self.router.num_layers,
            "hidden_size": int(self.router.weight.shape[-1]),
            "base_model": record_path(self.base_model) if self.base_model else self.base_model,
            **info,
        }

    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, Any] | None = None,
        *,
        overwrite: bool | None = None,
        inputs: OutputInputs = (),
    ) -> Path:
        """Write the mixture folder atomically (see the module docstring).

        ``extra`` adds to the record saved beside the header (:attr:`info`). An existing non-empty
        folder is replaced only with ``overwrite``; left unset it is false, except in the call form
        that passes ``extra`` (this method's form before the artefact protocol), where it stays
        true. ``path`` must not be, contain or lie inside the base model, the tokenizer recorded
        in the record, nor any of ``inputs`` (training data).
        """
        replace = (extra is not None) if overwrite is None else overwrite
        fields = self.describe(extra)
        known = [self.base_model, fields.get("tokenizer")]
        with artefact_dir(path, overwrite=replace, inputs=combine_inputs(known, inputs)) as tmp:
            write_safetensors({"weight": self.router.weight}, tmp / "router.safetensors")
            for i, expert in enumerate(self.experts()):
                save_lora(expert, tmp / "experts" / f"e{i}")
            write_header(tmp, FORMAT, VERSION, fields)
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
                raise ArtefactError(
                    f"{folder / 'experts' / f'e{i}'}: {wrong[0]} has rank {expert[wrong[0]].rank} but "
                    f"{MIXTURE_JSON} says config.rank={config.rank}"
                )
            experts.append(expert)
        mixture = cls(model, experts, router, config, meta.get("base_model"))
        mixture.info = {k: v for k, v in meta.items() if k not in _FIELDS}
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
    another format, a newer version, wrong types, NaN/inf, ``top_k`` beyond the experts, an
    unknown router kind.
    """
    return _read_meta(Path(path))[0]


def _read_meta(folder: Path) -> tuple[dict[str, Any], _MixtureMeta]:
    header = read_header(folder, FORMAT)
    meta_path, raw = header.path, header.fields
    meta = parse_model(_MixtureMeta, raw, str(meta_path), error=ArtefactError)
    settings = meta.config
    if settings.router not in ROUTINGS:
        raise ArtefactError(f"{meta_path}: config.router is {settings.router!r}; one of {sorted(ROUTINGS)}")
    if settings.top_k > settings.experts:
        raise ArtefactError(
            f"{meta_path}: config.top_k is {settings.top_k} but there are {settings.experts} experts"
        )
    described = {"format": FORMAT, "version": header.version, **raw}
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
        raise ArtefactError(f"{weights_path}: weight is {got}, expected {expected} from {MIXTURE_JSON}")
    return meta, config, tensors["weight"]
