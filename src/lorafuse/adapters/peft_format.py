"""Read and write LoRA adapters in PEFT's folder format.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (``(r, in)``) and ``...lora_B.weight``
(``(out, r)``). Per module, the rank comes from ``rank_pattern`` (else ``r``), alpha from
``alpha_pattern`` (else ``lora_alpha``) and the scale is ``α / r``, or ``α / √r`` with
``use_rslora``. Patterns match like PEFT's ``get_pattern_key``: ``(.*\\.)?(pattern)$`` against the
module path, first match wins.

``save_lora`` writes a folder ``PeftModel.from_pretrained`` loads unchanged: one default rank and
alpha, the modules that differ in ``rank_pattern``/``alpha_pattern`` under their full path, and
``use_rslora: false`` (the scale is carried by alpha).

Artefact format ``lorafuse-lora``: version 2 keeps lorafuse's header (kind, version, library
versions) in ``adapter_model.safetensors``' ``__metadata__["lorafuse"]``, which PEFT ignores;
version 1 is any PEFT folder without it (what PEFT and earlier lorafuse write). A free-form record
(merge recipe, training settings) may sit beside the adapter in ``lorafuse.json``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from lorafuse._artefact import Format, artefact_dir, header_metadata, read_header, register_format
from lorafuse._checks import InvalidValueError, PositiveInt, StrictBool, StrictPositiveFloat, parse_model
from lorafuse._io import (
    OutputInputs,
    all_finite,
    read_json_file,
    read_pickle_weights,
    read_safetensors,
    write_json,
    write_safetensors,
)
from lorafuse.adapters.lora import LoRA, LoRAModule
from lorafuse.errors import AdapterFormatError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
KEY_PREFIX = "base_model.model."
LORA_FORMAT = register_format(
    Format(
        kind="lorafuse-lora",
        version=2,
        header=WEIGHTS_NAME,
        noun="PEFT LoRA adapter",
        error=AdapterFormatError,
        upgrades={1: lambda fields, folder: dict(fields)},  # version 1: a PEFT folder, no header
        marker=CONFIG_NAME,
    )
)
# Source config fields carried over when saving; the rest (layers_to_transform, exclude_modules,
# ...) could make PEFT skip modules the tensors hold.
_PRESERVED = ("task_type", "fan_in_fan_out", "revision")
_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config fields lorafuse interprets; every other field is kept in LoRA.metadata.
_INTERPRETED = {
    "peft_type",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "modules_to_save",
    "base_model_name_or_path",
    "target_modules",
}


MAX_PATTERN_CHARS = 256
_REPEATED_GROUP = re.compile(r"\)[*+{]")  # a quantified group: the shape of catastrophic backtracking


def _pattern_regex(key: str) -> re.Pattern[str]:
    """PEFT's match for a ``rank_pattern`` / ``alpha_pattern`` key: the key ends the module path."""
    return re.compile(rf"(.*\.)?({key})$")


def pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The first key of ``patterns`` matching ``path`` as PEFT matches it, or ``None``."""
    for key in patterns:
        if _pattern_regex(key).match(path):
            return key
    return None


class AdapterConfig(BaseModel):
    """The fields of ``adapter_config.json`` lorafuse interprets, with PEFT's defaults.

    Numbers are JSON numbers (``true`` or ``"8"`` are not a rank), ranks whole and ≥ 1, alphas
    finite, > 0 and ≤ 1e6 (a larger alpha overflows half-precision products), flags real
    booleans (``"false"`` is a string, and a non-empty string is not false), pattern keys valid
    regular expressions without repeated groups (which can make matching take forever). Fields
    lorafuse does not interpret are ignored here and kept in :attr:`LoRA.metadata`.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    peft_type: str | None = None
    r: PositiveInt = 8
    lora_alpha: StrictPositiveFloat = 8.0
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, StrictPositiveFloat] | None = None
    use_rslora: StrictBool = False
    use_dora: StrictBool | None = False
    modules_to_save: Any = None
    base_model_name_or_path: str | None = None
    target_modules: Any = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regex_keys(cls, patterns: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in patterns or {}:
            if len(key) > MAX_PATTERN_CHARS or _REPEATED_GROUP.search(key):
                raise ValueError(
                    f"key {key[:60]!r} is refused: pattern keys are module names (at most "
                    f"{MAX_PATTERN_CHARS} characters, no repeated groups such as '(a+)*', which can "
                    "take exponential time to match)"
                )
            try:
                _pattern_regex(key)
            except (re.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"key {key!r} is not a valid regular expression ({exc})") from None
        return patterns

    def rank_for(self, path: str) -> tuple[int, str]:
        """The rank of module ``path`` and where it comes from (``rank_pattern['q_proj']`` or ``r``)."""
        key = pattern_key(self.rank_pattern or {}, path)
        if key is None:
            return self.r, "r"
        return (self.rank_pattern or {})[key], f"rank_pattern[{key!r}]"

    def alpha_for(self, path: str) -> tuple[float, str]:
        """The alpha of module ``path`` and where it comes from."""
        key = pattern_key(self.alpha_pattern or {}, path)
        if key is None:
            return self.lora_alpha, "lora_alpha"
        return (self.alpha_pattern or {})[key], f"alpha_pattern[{key!r}]"


def read_config_file(folder: Path) -> tuple[dict[str, Any], AdapterConfig]:
    """Read ``adapter_config.json``: the raw object and its validated interpreted fields.

    Every problem is one :class:`AdapterFormatError` (or :class:`UnsupportedAdapterError` for
    features lorafuse does not handle) naming the file, the field and the value.
    """
    config_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a folder; a PEFT adapter is a folder with {CONFIG_NAME}")
    if not config_path.is_file():
        raise AdapterFormatError(f"{config_path}: missing; is {folder} a PEFT adapter folder?")
    raw = read_json_file(config_path, AdapterFormatError, what="adapter config")
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{config_path}: peft_type is {peft_type!r}; only LORA adapters are supported"
        )
    config = parse_model(AdapterConfig, raw, str(config_path), error=AdapterFormatError)
    if config.use_dora:
        raise UnsupportedAdapterError(
            f"{config_path}: use_dora is true. DoRA rescales each output column by a learned "
            "magnitude, so it is not a sum of low-rank terms and cannot join a LoRA bank. Merge "
            "it into the base with PEFT (merge_and_unload) and treat the result as a fine-tune."
        )
    if config.modules_to_save:
        raise UnsupportedAdapterError(
            f"{config_path}: modules_to_save={config.modules_to_save!r} is not supported: "
            "those modules are full trained copies, not low-rank factors. Merge the adapter into "
            "the base with PEFT, or retrain it without modules_to_save."
        )
    if raw.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"{config_path}: target_parameters={raw['target_parameters']!r} is not supported: those "
            "LoRAs adapt parameters (such as a mixture of experts' fused 3-D expert weights), not "
            "linear layers, and lorafuse serves, merges and fuses LoRAs on linear layers "
            "(target_modules) only. Merge the adapter into the base with PEFT (merge_and_unload) and "
            "use the result as a base model"
        )
    for field in ("layer_replication", "trainable_token_indices"):
        if raw.get(field):
            raise UnsupportedAdapterError(
                f"{config_path}: {field}={raw[field]!r} is not supported; lorafuse handles "
                "LoRAs on linear layers given by target_modules only"
            )
    return raw, config


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` of a PEFT folder; the raw object."""
    return read_config_file(folder)[0]


def _read_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, Tensor]]:
    weights_path = folder / WEIGHTS_NAME
    if weights_path.is_file():
        return weights_path, read_safetensors(weights_path)
    for name in PICKLE_NAMES:
        if (folder / name).is_file():
            state = read_pickle_weights(folder / name, allow_pickle=allow_pickle)
            bad = [k for k, v in state.items() if not v.is_floating_point()]
            if bad:
                raise AdapterFormatError(
                    f"{folder / name}: expected floating-point tensors, found {bad[0]} "
                    f"({state[bad[0]].dtype})"
                )
            return folder / name, state
    raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME} (nor adapter_model.bin) in the folder")


def load_lora(path: str | os.PathLike[str], *, allow_pickle: bool = False, name: str | None = None) -> LoRA:
    """Load a PEFT LoRA folder into a :class:`LoRA`, validating it.

    Errors name the file and say what is wrong: missing or empty files, truncated safetensors,
    non-float or non-finite tensors, unpaired ``lora_A``/``lora_B``, ranks that disagree with the
    config, and features lorafuse does not support (DoRA, ``modules_to_save``, embedding LoRAs).
    ``.bin`` (pickle) weights load only with ``allow_pickle=True``, and then with
    ``weights_only=True``.
    """
    folder = Path(path)
    raw, config = read_config_file(folder)
    read_header(folder, LORA_FORMAT.kind)  # a version newer than this lorafuse reads is refused
    weights_path, state = _read_weights(folder, allow_pickle)
    if not state:
        raise AdapterFormatError(f"{weights_path}: holds no tensors")

    factors: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    unsupported: list[str] = []
    for key, tensor in state.items():
        match = _KEY_RE.match(key.removeprefix(KEY_PREFIX))
        if match is None:
            unsupported.append(key)
            continue
        if match["adapter"]:
            adapters.add(match["adapter"])
        factors.setdefault(match["path"], {})[match["ab"]] = tensor
    if unsupported:
        shown = ", ".join(unsupported[:4]) + (
            f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else ""
        )
        raise UnsupportedAdapterError(
            f"{weights_path}: tensors that are not plain LoRA factors: {shown}. lorafuse handles "
            "lora_A/lora_B weights of linear layers only (no embedding LoRAs, LoRA biases, "
            "trainable tokens or DoRA magnitudes)."
        )
    if len(adapters) > 1:
        raise AdapterFormatError(f"{weights_path}: holds several adapters {sorted(adapters)}; save one")

    config_path = folder / CONFIG_NAME
    modules: dict[str, LoRAModule] = {}
    for module_path in sorted(factors):
        pair = factors[module_path]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterFormatError(f"{weights_path}: {module_path} has no {missing}.weight")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{weights_path}: {module_path}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} are not (r, in) and (out, r) with the same r"
            )
        for ab, tensor in pair.items():
            if not all_finite(tensor):
                finite = torch.isfinite(tensor)
                raise AdapterFormatError(
                    f"{weights_path}: {module_path}.lora_{ab}.weight {tuple(tensor.shape)} has "
                    f"{int((~finite).sum())} non-finite values (NaN/inf); the adapter is corrupt "
                    "or its training diverged"
                )
        expected_r, source = config.rank_for(module_path)
        if expected_r != a.shape[0]:
            raise AdapterFormatError(
                f"{folder}: the config disagrees with the tensors: {module_path} has rank "
                f"{a.shape[0]} in {weights_path.name} (lora_A {tuple(a.shape)}) but "
                f"{CONFIG_NAME} says {source}={expected_r}"
            )
        alpha, alpha_source = config.alpha_for(module_path)
        scale = alpha / math.sqrt(expected_r) if config.use_rslora else alpha / expected_r
        if not (math.isfinite(scale) and scale > 0):
            raise AdapterFormatError(
                f"{config_path}: {alpha_source}={alpha!r} and rank {expected_r} give {module_path} "
                f"the scale {scale!r}; the scale must be a positive finite number"
            )
        modules[module_path] = LoRAModule(a, b, scale)

    metadata = {k: v for k, v in raw.items() if k not in _INTERPRETED}
    metadata["source"] = str(folder)
    return LoRA(
        modules,
        base_model=config.base_model_name_or_path,
        name=name or folder.name,
        metadata=metadata,
    )


def _alpha_of(module: LoRAModule) -> float:
    alpha = module.scale * module.rank
    return float(f"{alpha:.12g}")


def peft_config_for(lora: LoRA) -> dict[str, Any]:
    """The ``adapter_config.json`` content that reproduces ``lora``'s ranks and scales in PEFT."""
    ranks = {p: m.rank for p, m in lora.modules.items()}
    alphas = {p: _alpha_of(m) for p, m in lora.modules.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    keep = {k: lora.metadata[k] for k in _PRESERVED if k in lora.metadata}
    config: dict[str, Any] = {
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        **keep,
        "peft_type": "LORA",
        "base_model_name_or_path": lora.base_model,
        "r": default_r,
        "lora_alpha": int(default_alpha) if float(default_alpha).is_integer() else default_alpha,
        "rank_pattern": {p: r for p, r in ranks.items() if r != default_r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != default_alpha},
        "target_modules": lora.module_kinds,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    return config


def save_lora(
    lora: LoRA,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
    inputs: OutputInputs = (),
) -> Path:
    """Write ``lora`` as a PEFT folder (atomically) and return its path.

    ``dtype`` converts the factors (default: keep theirs). ``extra`` (default
    ``lora.metadata["lorafuse"]``: merge recipes, versions) is written beside the adapter as
    ``lorafuse.json``, never into PEFT's config. ``path`` must not be, contain or lie inside any
    of ``inputs`` (the folders ``lora`` was made from), whatever ``overwrite`` says; an existing
    non-empty folder is replaced only with ``overwrite``. The header goes into the weights
    file's metadata (see the module docstring).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidValueError(
            f"cannot save a LoRA as {dtype}: adapters are floating point (float32, float16, bfloat16)"
        )
    out = Path(path)
    tensors: dict[str, Tensor] = {}
    for module_path, module in lora.modules.items():
        tensors[f"{KEY_PREFIX}{module_path}.lora_A.weight"] = module.A.to(dtype or module.A.dtype)
        tensors[f"{KEY_PREFIX}{module_path}.lora_B.weight"] = module.B.to(dtype or module.B.dtype)
    header = header_metadata(LORA_FORMAT.kind, LORA_FORMAT.version, {})
    with artefact_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", **header})
        write_json(peft_config_for(lora), tmp / CONFIG_NAME)
        side = extra if extra is not None else lora.metadata.get("lorafuse")
        if side is not None:
            write_json(side, tmp / "lorafuse.json")
    return out
