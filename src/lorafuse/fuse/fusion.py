"""A saved fusion: how to weight a bank of LoRAs, and which LoRAs (with hashes) it needs.

Folder layout (format ``lorafuse-fusion``, version 1)::

    fusion.json          method, LoRA names + paths + SHA-256 of their files, gate/weight settings,
                         training record (data sizes, seed, losses), versions
    weights.safetensors  ``gate.weight (G, k, hidden)`` + ``gate.bias (G, k)`` (lora-flow),
                         ``logits (modules, k)`` (cat-weights) or ``weights (k,)`` (static)

Methods: ``lora-flow`` (per-token, per-layer gates), ``cat-weights`` (LoRA Soups: one softmax-
normalised weight per LoRA per module), ``static`` (one weight per LoRA: average, LoraHub, a
hand-written composition). Saved atomically; loading checks every LoRA's hash before use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    write_safetensors,
)
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import LorafuseError
from lorafuse.fuse.cat_weights import CatWeights
from lorafuse.fuse.flow import LoRAFlow
from lorafuse.fuse.gate import FlowGates, GateConfig
from lorafuse.runtime import AttachedBank, attach

FORMAT = "lorafuse-fusion"
VERSION = 1
METHODS = ("lora-flow", "cat-weights", "static")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class FusionFormatError(LorafuseError):
    """A fusion folder that cannot be read, or LoRAs that do not match the ones it was made with."""


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

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def source(self, handle: AttachedBank) -> nn.Module | None:
        """Install this fusion's weights on an attached bank (the bank's LoRA order must match)."""
        if handle.names != self.lora_names:
            raise FusionFormatError(f"the bank holds {handle.names}, the fusion needs {self.lora_names}")
        device = next(iter(handle.banks.values())).A.device
        if self.method == "static":
            handle.set_weights(self.tensors["weights"])
            return None
        if self.method == "cat-weights":
            cat = CatWeights(self.module_paths, self.k).to(device)
            with torch.no_grad():
                cat.logits.copy_(self.tensors["logits"])
            missing = set(handle.banks) - set(self.module_paths)
            if missing:
                raise FusionFormatError(f"no CAT weights for modules {sorted(missing)[:3]}")
            handle.set_source(cat)
            return cat
        assert self.gate is not None
        gates = FlowGates(self.gate).to(device)
        with torch.no_grad():
            gates.weight.copy_(self.tensors["gate.weight"])
            gates.bias.copy_(self.tensors["gate.bias"])
        return LoRAFlow(gates).install(handle)

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
            if verify and self.lora_hashes.get(name) and adapter_hashes(path) != self.lora_hashes[name]:
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


def save_fusion(
    fusion: Fusion, out: str | Path, *, overwrite: bool = True, inputs: OutputInputs = ()
) -> Path:
    """Write ``fusion`` to the folder ``out`` atomically.

    ``out`` must not be, contain or lie inside the fusion's LoRAs, its base model or tokenizer,
    nor any of ``inputs`` (training data, checkpoints): those are never replaced.
    """
    if fusion.method not in METHODS:
        raise ValueError(f"unknown fusion method {fusion.method!r}; one of {METHODS}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": fusion.method,
        "loras": [
            {"name": n, "path": fusion.lora_paths.get(n), "sha256": fusion.lora_hashes.get(n, {})}
            for n in fusion.lora_names
        ],
        "gate": fusion.gate.to_json() if fusion.gate else None,
        "module_paths": fusion.module_paths,
        "num_params": fusion.num_params,
        "info": fusion.info,
        "versions": versions(),
    }
    known = [*fusion.lora_paths.values(), fusion.info.get("base_model"), fusion.info.get("tokenizer")]
    with atomic_output_dir(out, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
        write_safetensors({k: v.float() for k, v in fusion.tensors.items()}, tmp / "weights.safetensors")
        (tmp / "fusion.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def load_fusion(folder: str | Path) -> Fusion:
    """Read a fusion folder written by :func:`save_fusion`."""
    folder = Path(folder)
    meta_path = folder / "fusion.json"
    if not meta_path.is_file():
        raise FusionFormatError(f"{folder}: not a fusion folder (no fusion.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise FusionFormatError(f"{meta_path}: invalid JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FusionFormatError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    if meta.get("method") not in METHODS:
        raise FusionFormatError(f"{meta_path}: unknown method {meta.get('method')!r}")
    tensors = read_safetensors(folder / "weights.safetensors")
    gate = None
    if meta["method"] == "lora-flow":
        g = dict(meta["gate"])
        g["module_paths"] = tuple(g.get("module_paths", ()))
        gate = GateConfig(**g)
        expected = {
            "gate.weight": (gate.num_gates, gate.k, gate.hidden_size),
            "gate.bias": (gate.num_gates, gate.k),
        }
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise FusionFormatError(
                    f"{folder / 'weights.safetensors'}: {name} is {got}, expected {shape}"
                )
    loras = meta["loras"]
    return Fusion(
        method=meta["method"],
        lora_names=[x["name"] for x in loras],
        tensors=tensors,
        gate=gate,
        module_paths=list(meta.get("module_paths", [])),
        lora_paths={x["name"]: x["path"] for x in loras if x.get("path")},
        lora_hashes={x["name"]: x.get("sha256", {}) for x in loras},
        info=meta.get("info", {}),
    )
