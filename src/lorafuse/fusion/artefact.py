"""A saved fusion: how to weight a bank of LoRAs, and which LoRAs (with hashes) it needs.

Folder layout (format ``lorafuse-fusion``, version 1)::

    fusion.json          method, LoRA names + paths + SHA-256 of their files, gate/weight settings,
                         training record (data sizes, seed, losses), versions
    weights.safetensors  ``gate.weight (G, k, hidden)`` + ``gate.bias (G, k)`` (lora-flow),
                         ``logits (modules, k)`` (cat-weights) or ``weights (k,)`` (static)

Methods: ``lora-flow`` (per-token, per-layer gates), ``cat-weights`` (LoRA Soups: one softmax-
normalised weight per LoRA per module), ``static`` (one weight per LoRA: average, LoraHub, a
hand-written composition). Saved atomically (:meth:`Fusion.save`); loading (:meth:`Fusion.load`)
checks the header through the artefact protocol (:mod:`lorafuse._artefact`) and every LoRA's hash
before use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints
from torch import Tensor, nn

from lorafuse._artefact import Format, artefact_dir, read_header, register_format, write_header
from lorafuse._checks import (
    MAX_MAGNITUDE,
    PositiveInt,
    Sha256Hex,
    StrictBool,
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
from lorafuse._registry import Registry
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import ArtefactError, LorafuseError
from lorafuse.fusion.cat_weights import CatWeighting
from lorafuse.fusion.flow import FlowWeighting
from lorafuse.fusion.gate import GateConfig
from lorafuse.fusion.weighting import StaticWeighting, Weighting
from lorafuse.runtime import AttachedBank, attach

FORMAT = "lorafuse-fusion"
VERSION = 1

# The stored kinds of fusion (``fusion.json``'s ``method``); each owns its tensors and weight rule.
WEIGHTINGS: Registry[Weighting] = Registry("fusion kind")
for _weighting in (StaticWeighting(), CatWeighting(), FlowWeighting()):
    WEIGHTINGS.register(_weighting)
METHODS = tuple(WEIGHTINGS.names())
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class FusionFormatError(ArtefactError):
    """A fusion folder that cannot be read, or LoRAs that do not match the ones it was made with."""


FUSION_FORMAT = register_format(
    Format(kind=FORMAT, version=VERSION, header="fusion.json", noun="fusion", error=FusionFormatError)
)


def adapter_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of a PEFT folder's config and weights (the files a fusion depends on)."""
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ADAPTER_FILES
        if (folder / name).is_file()
    }


@dataclass
class Fusion:
    """A trained (or hand-written) weighting of a named bank of LoRAs."""

    method: str
    lora_names: list[str]
    tensors: dict[str, Tensor]
    gate: GateConfig | None = None
    module_paths: list[str] = field(default_factory=list)  # cat-weights: row order of ``logits``
    lora_paths: dict[str, str] = field(default_factory=dict)
    lora_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # training record, base model, versions

    @property
    def k(self) -> int:
        return len(self.lora_names)

    def save(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, inputs: OutputInputs = ()
    ) -> Path:
        """Write the fusion folder atomically (:func:`save_fusion`); non-empty needs ``overwrite``."""
        return save_fusion(self, path, overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Fusion:
        """Read a fusion folder (:func:`load_fusion`)."""
        return load_fusion(path)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def weighting(self) -> Weighting:
        """How this fusion's kind (``method``) weights the bank (:data:`WEIGHTINGS`)."""
        return WEIGHTINGS[self.method]

    @property
    def dynamic(self) -> bool:
        """Whether a rule computes the weights in every forward pass (not one static vector)."""
        return self.weighting.dynamic

    def build_rule(self) -> nn.Module | None:
        """A new module holding this fusion's learned weight rule (``None`` for static weights)."""
        return self.weighting.build_rule(self.tensors, self.gate, self.module_paths)

    def weight_rule(self, device: torch.device | str | None = None) -> nn.Module | None:
        """The fusion's weight rule, frozen and built once (serving reuses it for every batch)."""
        rules: dict[str, nn.Module] = self.__dict__.setdefault("_rules", {})
        key = str(device)
        if key not in rules and self.dynamic:
            rule = self.build_rule()
            assert rule is not None
            rule.requires_grad_(False)
            rules[key] = rule.to(device) if device is not None else rule
        return rules.get(key)

    def source(self, handle: AttachedBank) -> nn.Module | None:
        """Install this fusion's weights on an attached bank (the bank's LoRA order must match)."""
        if handle.names != self.lora_names:
            raise FusionFormatError(f"the bank holds {handle.names}, the fusion needs {self.lora_names}")
        weighting = self.weighting
        problem = weighting.bank_problem(handle, self.module_paths)
        if problem:
            raise FusionFormatError(problem)
        rule = self.build_rule()
        if rule is not None:
            rule = rule.to(next(iter(handle.banks.values())).A.device)
        weighting.install(rule, self.tensors, handle)
        return rule

    def load_loras(
        self, overrides: Mapping[str, str | Path] | None = None, *, verify: bool = True
    ) -> dict[str, LoRA]:
        """Load the LoRAs from their recorded paths (or ``overrides``), checking their hashes."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.lora_names))
        if unknown:
            raise FusionFormatError(
                f"overrides name LoRAs {unknown} that the fusion does not use ({self.lora_names})"
            )
        loras = {}
        for name in self.lora_names:
            path = Path(overrides.get(name, self.lora_paths.get(name, "")))
            if not path.is_dir():
                raise FusionFormatError(
                    f"LoRA {name!r} of the fusion is not at {path}; pass its folder with --lora {name}=DIR"
                )
            if verify and not self.lora_hashes.get(name):
                raise FusionFormatError(
                    f"LoRA {name!r} of the fusion has no recorded SHA-256, so it cannot be checked; "
                    "pass verify=False to load it unchecked"
                )
            if verify and adapter_hashes(path) != self.lora_hashes[name]:
                raise FusionFormatError(
                    f"LoRA {name!r} at {path} differs from the one the fusion was trained with "
                    "(SHA-256 mismatch); use the original adapter or retrain the fusion"
                )
            loras[name] = load_lora(path)
        return loras

    def attach(
        self, model: nn.Module, loras: Mapping[str, LoRA] | None = None, **kwargs: Any
    ) -> AttachedBank:
        """Attach the fusion's LoRAs to ``model`` and install its weights; returns the bank handle."""
        loras = loras if loras is not None else self.load_loras()
        handle = attach(model, {n: loras[n] for n in self.lora_names}, **kwargs)
        handle.fusion_source = self.source(handle)  # type: ignore[attr-defined]
        return handle


class _LoRAEntry(BaseModel):
    """One LoRA of ``fusion.json``: its name, folder and the SHA-256 of its files."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    name: Annotated[str, StringConstraints(strict=True, min_length=1)]
    path: str | None = None
    sha256: Annotated[dict[Literal[ADAPTER_FILES], Sha256Hex], Field(min_length=1)]  # type: ignore[valid-type]


class _GateSettings(BaseModel):
    """``fusion.json``'s ``gate`` (the fields of :class:`GateConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    k: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt
    granularity: Literal["layer", "module", "step"] = "layer"
    temperature: StrictPositiveFloat = 1.0
    bias_in_softmax: StrictBool = False
    start: StrictInt | None = -1
    module_paths: list[Annotated[str, StringConstraints(strict=True)]] = []


class _FusionMeta(BaseModel):
    """What :func:`load_fusion` needs from ``fusion.json`` (format and version checked first)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    method: Literal[METHODS]  # type: ignore[valid-type]
    loras: Annotated[list[_LoRAEntry], Field(min_length=1)]
    gate: _GateSettings | None = None
    module_paths: list[Annotated[str, StringConstraints(strict=True)]] = []
    info: dict[str, Any] = {}


def _check_tensors(fusion: Fusion, where: str) -> None:
    """Finite tensors no larger than ``MAX_MAGNITUDE`` (a NaN gate would NaN every output)."""
    for name, tensor in fusion.tensors.items():
        values = tensor.detach().float()
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise FusionFormatError(
                f"{where}: {name} {tuple(tensor.shape)} has {bad} non-finite values (NaN/inf)"
            )
        if values.numel() and float(values.abs().max()) > MAX_MAGNITUDE:
            raise FusionFormatError(
                f"{where}: {name} holds {float(values.abs().max()):g}; fusion weights must lie within "
                f"±{MAX_MAGNITUDE:g}"
            )


def save_fusion(
    fusion: Fusion, out: str | os.PathLike[str], *, overwrite: bool = True, inputs: OutputInputs = ()
) -> Path:
    """Write ``fusion`` to the folder ``out`` atomically.

    ``out`` must not be, contain or lie inside the fusion's LoRAs, its base model or tokenizer,
    nor any of ``inputs`` (training data, checkpoints): those are never replaced.
    LoRA folders and a base model recorded as a path are written absolute, so the fusion works
    from any current folder. Every LoRA must have the SHA-256 of its files (a fusion never loads
    LoRAs it cannot check), and the tensors must be finite.
    """
    if fusion.method not in WEIGHTINGS:
        raise FusionFormatError(f"unknown fusion method {fusion.method!r}; one of {', '.join(METHODS)}")
    unhashed = [n for n in fusion.lora_names if not fusion.lora_hashes.get(n)]
    if unhashed:
        raise FusionFormatError(
            f"the fusion's LoRA(s) {unhashed} have no recorded SHA-256; fuse LoRAs given by their "
            "folders (or loaded from them) so the fusion can check them when it is loaded"
        )
    _check_tensors(fusion, "cannot save the fusion")
    info = dict(fusion.info)
    for key in ("base_model", "tokenizer"):
        if isinstance(info.get(key), str):
            info[key] = record_path(info[key])
    fields = {
        "method": fusion.method,
        "loras": [
            {
                "name": n,
                "path": record_path(fusion.lora_paths[n]) if fusion.lora_paths.get(n) else None,
                "sha256": fusion.lora_hashes.get(n, {}),
            }
            for n in fusion.lora_names
        ],
        "gate": fusion.gate.to_json() if fusion.gate else None,
        "module_paths": fusion.module_paths,
        "num_params": fusion.num_params,
        "info": finite_or_none(info),
    }
    known = [*fusion.lora_paths.values(), fusion.info.get("base_model"), fusion.info.get("tokenizer")]
    with artefact_dir(out, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
        write_safetensors({k: v.float() for k, v in fusion.tensors.items()}, tmp / "weights.safetensors")
        write_header(tmp, FORMAT, VERSION, fields)
    return Path(out)


def load_fusion(folder: str | os.PathLike[str]) -> Fusion:
    """Read a fusion folder written by :func:`save_fusion`.

    Every problem is one :class:`FusionFormatError` naming the file and field: a missing or
    malformed ``fusion.json`` (missing fields, wrong types, ``gate: null`` for ``lora-flow``, a
    LoRA without a well-formed SHA-256, repeated names), a missing or damaged
    ``weights.safetensors``, tensors whose shapes disagree with the description, NaN/inf or
    out-of-range weights. Relative paths of older fusions are resolved from the fusion folder
    (else the current folder).
    """
    folder = Path(folder)
    header = read_header(folder, FORMAT)
    meta_path = header.path
    meta = parse_model(_FusionMeta, header.fields, str(meta_path), error=FusionFormatError)
    names = [x.name for x in meta.loras]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FusionFormatError(f"{meta_path}: loras: the name(s) {repeated} appear more than once")
    weighting = WEIGHTINGS[meta.method]
    gate = None
    if weighting.gated and meta.gate is not None:
        settings = meta.gate.model_dump()
        settings["module_paths"] = tuple(settings["module_paths"])
        try:
            gate = GateConfig(**settings)
        except ValueError as exc:
            raise FusionFormatError(f"{meta_path}: gate: {exc}") from None
    problem = weighting.check(len(names), gate, meta.module_paths)
    if problem:
        raise FusionFormatError(f"{meta_path}: {problem}")
    weights_path = folder / "weights.safetensors"
    if not weights_path.is_file():
        raise FusionFormatError(f"{weights_path}: missing; the fusion folder is incomplete")
    try:
        tensors = read_safetensors(weights_path)
    except LorafuseError as exc:
        raise FusionFormatError(str(exc)) from None
    expected = weighting.shapes(len(names), gate, meta.module_paths)
    for name, shape in expected.items():
        got = tuple(tensors[name].shape) if name in tensors else "missing"
        if got != shape:
            raise FusionFormatError(f"{weights_path}: {name} is {got}, expected {shape} from fusion.json")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise FusionFormatError(f"{weights_path}: unexpected tensor(s) {extra} for a {meta.method} fusion")
    info = dict(meta.info)
    for key in ("base_model", "tokenizer"):
        if isinstance(info.get(key), str):
            info[key] = resolve_recorded_path(info[key], folder)
    fusion = Fusion(
        method=meta.method,
        lora_names=names,
        tensors=tensors,
        gate=gate,
        module_paths=list(meta.module_paths),
        lora_paths={x.name: resolve_recorded_path(x.path, folder) for x in meta.loras if x.path},
        lora_hashes={x.name: dict(x.sha256) for x in meta.loras},
        info=info,
    )
    _check_tensors(fusion, str(weights_path))
    return fusion
