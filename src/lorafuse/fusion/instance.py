"""Instance-level basis mixing (LoRWeB's idea) and the per-request mode switch (Phi-4-multimodal).

**Basis mixing.** A small encoder maps a pooled prompt representation to coefficients over a
basis of k existing LoRAs, fixed for the whole sequence (LoRWeB: a query from an encoder attends
over learnable keys, one per basis LoRA)::

    p = rms(mean_{t ∈ prompt} e_t)                (H,)   e_t: residual entering layer 0 (embeddings)
    q = W_q p                                      (d,)
    s = K q / √d                                   (k,)   K: (k, d) learnable keys
    c = softmax(s / τ)  or  tanh(s)                (k,)   optionally only over the top-k of s
    h = W0 x + Σ_i c_i s_i B_i A_i x               every adapted module, every token

The prompt is pooled from the embeddings, so the coefficients are known before layer 0's LoRAs
act: no second pass of the base (X-LoRA's cost). They are computed on the first forward call of
a sequence and kept for the following ``generate`` steps (with the KV cache, or without it, when
each step re-feeds the prompt plus the generated tokens). In training, the
prompt is the tokens whose label is ``-100``. Only the encoder trains (base and LoRAs frozen),
with the shared loop.

**Mode switch.** Phi-4-multimodal switches its LoRA set per request by modality; here a mode
names a set of LoRAs and becomes a fixed weight row (1 on the set, 0 elsewhere):
:func:`mode_weights`.

**Folder** (artefact format ``lorafuse-instance-encoder``, written atomically)::

    encoder.json          format, version, config, hidden_size, basis {name: LoRA folder},
                          base_model, versions, and beside them the caller's record (tokenizer,
                          training settings: :attr:`InstanceMixing.info`)
    encoder.safetensors   query (d, H), keys (k, d)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints
from torch import Tensor, nn

from lorafuse._artefact import Format, artefact_dir, read_header, register_format, write_header
from lorafuse._checks import InvalidValueError, PositiveInt, StrictPositiveFloat, finite_or_none, parse_model
from lorafuse._data import Encoded
from lorafuse._io import (
    OutputInputs,
    combine_inputs,
    read_safetensors,
    record_path,
    resolve_recorded_path,
    write_safetensors,
)
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import ArtefactError, LorafuseError
from lorafuse.runtime import AttachedBank, ForwardCall, LayerInputSource, Reads, attach, detach
from lorafuse.train.loop import TrainConfig, train_loop

FORMAT = "lorafuse-instance-encoder"
VERSION = 1
ENCODER_JSON = "encoder.json"
ACTIVATIONS = ("softmax", "tanh")
_FIELDS = ("format", "version", "config", "hidden_size", "basis", "base_model", "versions")


ENCODER_FORMAT = register_format(
    Format(
        kind=FORMAT,
        version=VERSION,
        header=ENCODER_JSON,
        noun="instance encoder",
        error=ArtefactError,
    )
)


@dataclass(frozen=True)
class EncoderConfig:
    activation: str = "softmax"  # softmax | tanh
    dim: int = 64  # query/key width d
    top_k: int | None = None  # keep only the top-k scores (sparse basis), None = all
    temperature: float = 1.0
    seed: int = 0


class InstanceEncoder(nn.Module):
    """Pooled prompt ``(B, H)`` → coefficients ``(B, k)`` over the basis (see the module docstring)."""

    def __init__(self, hidden_size: int, k: int, config: EncoderConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise LorafuseError(f"unknown activation {config.activation!r}; choose one of {ACTIVATIONS}")
        if config.top_k is not None and not 1 <= config.top_k <= k:
            raise LorafuseError(f"top_k must be between 1 and the {k} basis LoRAs, got {config.top_k}")
        self.config, self.k = config, k
        generator = torch.Generator().manual_seed(config.seed)
        self.query = nn.Parameter(
            torch.randn(config.dim, hidden_size, generator=generator) / math.sqrt(hidden_size)
        )
        self.keys = nn.Parameter(torch.randn(k, config.dim, generator=generator) * 0.02)

    def forward(self, pooled: Tensor) -> Tensor:
        p = pooled.float() * torch.rsqrt(pooled.float().pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, H)
        scores = (p @ self.query.T) @ self.keys.T / math.sqrt(self.config.dim)  # (B, k)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.config.top_k is not None:
            keep = torch.zeros_like(keep).scatter(-1, scores.topk(self.config.top_k, -1).indices, True)
        if self.config.activation == "softmax":
            return torch.softmax((scores / self.config.temperature).masked_fill(~keep, float("-inf")), -1)
        return torch.tanh(scores) * keep


class InstanceSource:
    """The encoder's weight rule: per-sequence coefficients ``(B, 1, k)`` from the pooled prompt.

    Reads the input of the first decoder layer (``reads = "first"``), pooled over the prompt's
    tokens (the attention mask, and only prompt tokens when labels mark answers with -100). The
    coefficients are computed once per sequence and kept while the sequence continues (the KV
    cache holds its past, or ``generate`` without the cache re-feeds the prompt plus new tokens).
    """

    reads: Reads = "first"
    per_module = False

    def __init__(self, encoder: InstanceEncoder, model: nn.Module) -> None:
        self.encoder = encoder
        self.coefficients: Tensor | None = None  # (B, k) of the current sequences
        self._prompt: Tensor | None = None  # (B, T0) ids of the current sequences' prompt
        self.source = LayerInputSource(model, self)

    def _continued(self, call: ForwardCall) -> bool:
        ids, prompt = call.input_ids, self._prompt
        if call.past_length > 0:
            return True
        if ids is None or prompt is None:
            return False
        width = prompt.shape[1]
        return bool(
            ids.shape[0] == prompt.shape[0]
            and ids.shape[1] > width
            and torch.equal(ids[:, :width].to(prompt.device), prompt)
        )

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``encoder(mean of the prompt's first-layer inputs) (B, 1, k)``."""
        if self._continued(call) and self.coefficients is not None:
            return self.coefficients.unsqueeze(1)  # (B, 1, k)
        self._prompt = call.input_ids.detach().clone() if call.input_ids is not None else None
        pool = call.attention_mask.bool() if call.attention_mask is not None else None
        if call.labels is not None:
            prompt_tokens = call.labels == -100
            pool = prompt_tokens if pool is None else pool & prompt_tokens
        T = hidden.shape[1]
        m = torch.ones(hidden.shape[:2], device=hidden.device) if pool is None else pool[:, -T:].float()
        pooled = (hidden.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)  # (B, H)
        self.coefficients = self.encoder(pooled)  # (B, k)
        return self.coefficients.unsqueeze(1)  # (B, 1, k)

    def remove(self) -> None:
        self.source.remove()


class InstanceMixing:
    """A basis of LoRAs attached to a model, weighted per sequence by an :class:`InstanceEncoder`.

    ``basis_paths`` (default: each LoRA's ``metadata["source"]``, the folder it was loaded from),
    ``base_model`` and ``info`` (a free-form record) are what :meth:`save` writes beside the
    encoder; the basis LoRAs themselves stay in their folders.
    """

    def __init__(
        self,
        model: nn.Module,
        basis: Mapping[str, LoRA],
        encoder: InstanceEncoder,
        *,
        basis_paths: Mapping[str, str | os.PathLike[str]] | None = None,
        base_model: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.encoder = model, encoder
        self.bank: AttachedBank = attach(model, dict(basis))
        self.source = InstanceSource(encoder, model)
        self.bank.set_source(self.source.source)
        sources = {n: lora.metadata.get("source") for n, lora in basis.items()}
        self.basis_paths: dict[str, str] = {n: str(p) for n, p in sources.items() if isinstance(p, str)}
        self.basis_paths |= {n: str(p) for n, p in (basis_paths or {}).items()}
        self.base_model = base_model
        self.info: dict[str, Any] = dict(info or {})

    @property
    def names(self) -> list[str]:
        return self.bank.names

    def save(
        self,
        path: str | os.PathLike[str],
        basis_paths: Mapping[str, str | os.PathLike[str]] | None = None,
        base_model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        *,
        overwrite: bool | None = None,
        inputs: OutputInputs = (),
    ) -> Path:
        """Write ``encoder.json`` (config, basis names and folders, base, record) and ``encoder.safetensors``.

        ``basis_paths``, ``base_model`` and ``extra`` update :attr:`basis_paths`, :attr:`base_model`
        and :attr:`info` for this write. An existing non-empty folder is replaced only with
        ``overwrite``; left unset it is false, except in the call form that passes
        ``basis_paths`` (this method's form before the artefact protocol), where it stays true.
        ``path`` must not be, contain or lie inside a basis LoRA, the base model, the recorded
        tokenizer, nor any of ``inputs`` (training data).
        """
        replace = (basis_paths is not None) if overwrite is None else overwrite
        paths = {**self.basis_paths, **{n: str(p) for n, p in (basis_paths or {}).items()}}
        missing = [n for n in self.names if n not in paths]
        if missing:
            raise InvalidValueError(
                f"cannot save the instance encoder to {path}: no folder is known for the basis "
                f"LoRA(s) {missing}; pass basis_paths={{name: folder}}"
            )
        base = base_model if base_model is not None else self.base_model
        info = finite_or_none({**self.info, **dict(extra or {})})
        clash = sorted(set(info) & set(_FIELDS))
        if clash:
            raise InvalidValueError(
                f"the encoder's record {clash} would replace the header's own fields; rename those keys"
            )
        if isinstance(info.get("tokenizer"), str):
            info["tokenizer"] = record_path(info["tokenizer"])
        fields = {
            "config": asdict(self.encoder.config),
            "hidden_size": int(self.encoder.query.shape[1]),
            "basis": {name: record_path(paths[name]) for name in self.names},
            "base_model": record_path(base) if base else base,
            **info,
        }
        known = [*(paths[n] for n in self.names), base, info.get("tokenizer")]
        with artefact_dir(path, overwrite=replace, inputs=combine_inputs(known, inputs)) as tmp:
            write_safetensors(dict(self.encoder.state_dict()), tmp / "encoder.safetensors")
            write_header(tmp, FORMAT, VERSION, fields)
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        basis: Mapping[str, LoRA | str | os.PathLike[str]] | None = None,
    ) -> InstanceMixing:
        """Attach a saved encoder and its basis LoRAs to ``model`` (frozen, ready for ``generate``).

        The basis LoRAs load from their recorded folders; ``basis`` replaces some of them (a
        :class:`LoRA` or a folder per name). Errors name the file and field (:func:`read_encoder`).
        """
        described, encoder = read_encoder(path)
        recorded: dict[str, str] = described["basis"]
        overrides = dict(basis or {})
        unknown = sorted(set(overrides) - set(recorded))
        if unknown:
            raise ArtefactError(
                f"{path}: basis overrides {unknown} name no LoRA of the encoder ({list(recorded)})"
            )
        loras: dict[str, LoRA] = {}
        folders: dict[str, str] = {}
        for name, folder in recorded.items():
            given = overrides.get(name, folder)
            if isinstance(given, LoRA):
                loras[name] = given
                folders[name] = str(given.metadata.get("source") or folder)
                continue
            if not Path(given).is_dir():
                raise ArtefactError(
                    f"{Path(path) / ENCODER_JSON}: basis LoRA {name!r} is not at {given}; pass "
                    f"basis={{{name!r}: folder}}"
                )
            loras[name], folders[name] = load_lora(given), str(given)
        return cls(
            model,
            loras,
            encoder,
            basis_paths=folders,
            base_model=described.get("base_model"),
            info={k: v for k, v in described.items() if k not in _FIELDS},
        )

    def remove(self) -> nn.Module:
        self.source.remove()
        return detach(self.model)


class _EncoderSettings(BaseModel):
    """``encoder.json``'s ``config`` (the fields of :class:`EncoderConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    activation: Literal[ACTIVATIONS] = "softmax"  # type: ignore[valid-type]
    dim: PositiveInt = 64
    top_k: PositiveInt | None = None
    temperature: StrictPositiveFloat = 1.0
    seed: StrictInt = 0


class _EncoderMeta(BaseModel):
    """What :func:`read_encoder` needs from ``encoder.json`` (format and version checked first)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    config: _EncoderSettings
    hidden_size: PositiveInt
    basis: Annotated[
        dict[str, Annotated[str, StringConstraints(strict=True, min_length=1)]], Field(min_length=1)
    ]
    base_model: str | None = None


def read_encoder(path: str | os.PathLike[str]) -> tuple[dict[str, Any], InstanceEncoder]:
    """The description and the encoder of a saved folder (the basis LoRAs are loaded by the caller).

    Every problem is one :class:`LorafuseError` naming the file and field: a missing or malformed
    ``encoder.json`` (wrong types, NaN, an empty basis, ``top_k`` beyond the basis, a newer
    version), a missing or damaged ``encoder.safetensors``, tensors whose shapes disagree with
    the description or hold NaN/inf. Relative basis and base paths are resolved from the folder,
    else the current folder.
    """
    folder = Path(path)
    header = read_header(folder, FORMAT)
    meta_path, raw = header.path, header.fields
    meta = parse_model(_EncoderMeta, raw, str(meta_path), error=ArtefactError)
    k, settings = len(meta.basis), meta.config
    if settings.top_k is not None and settings.top_k > k:
        raise ArtefactError(f"{meta_path}: config.top_k is {settings.top_k} but the basis holds {k} LoRAs")
    weights_path = folder / "encoder.safetensors"
    state = read_safetensors(weights_path, require_finite=True)
    expected = {"query": (settings.dim, meta.hidden_size), "keys": (k, settings.dim)}
    for name, shape in expected.items():
        got = tuple(state[name].shape) if name in state else "missing"
        if got != shape:
            raise ArtefactError(f"{weights_path}: {name} is {got}, expected {shape} from encoder.json")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ArtefactError(f"{weights_path}: unexpected tensor(s) {extra}")
    encoder = InstanceEncoder(meta.hidden_size, k, EncoderConfig(**settings.model_dump()))
    encoder.load_state_dict(state)
    encoder.requires_grad_(False)
    described = {"format": FORMAT, "version": header.version, **raw}
    described["basis"] = {name: resolve_recorded_path(p, folder) for name, p in meta.basis.items()}
    for key in ("base_model", "tokenizer"):
        if isinstance(described.get(key), str):
            described[key] = resolve_recorded_path(described[key], folder)
    return described, encoder


def train_encoder(
    model: nn.Module,
    basis: Mapping[str, LoRA],
    data: Sequence[Encoded],
    config: EncoderConfig,
    train: TrainConfig,
    *,
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[InstanceMixing, list[float]]:
    """Attach ``basis`` to ``model`` and train only the encoder's coefficients with the shared loop."""
    model.requires_grad_(False)
    encoder = InstanceEncoder(int(model.config.hidden_size), len(basis), config)
    mixing = InstanceMixing(model, basis, encoder)
    losses = train_loop(
        model, encoder.parameters(), data, train, pad_id=pad_id, desc="instance encoder", progress=progress
    )
    encoder.requires_grad_(False)
    return mixing, losses


def mode_weights(
    names: Sequence[str], modes: Mapping[str, Sequence[str]], mode: str | Sequence[str]
) -> Tensor:
    """A mode's fixed weight row ``(k,)`` (1 on its LoRA set), or ``(batch, k)`` for one mode per request."""
    if not isinstance(mode, str):
        return torch.stack([mode_weights(names, modes, m) for m in mode])  # (batch, k)
    if mode not in modes:
        raise LorafuseError(f"unknown mode {mode!r}; the modes are {sorted(modes)}")
    unknown = sorted(set(modes[mode]) - set(names))
    if unknown:
        raise LorafuseError(f"mode {mode!r} names LoRA(s) {unknown} that are not in the bank {list(names)}")
    return torch.tensor([1.0 if n in modes[mode] else 0.0 for n in names])
