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

from lorafuse._checks import PositiveInt, StrictPositiveFloat, finite_or_none, parse_model
from lorafuse._data import Encoded
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
from lorafuse.adapters import LoRA
from lorafuse.errors import LorafuseError
from lorafuse.runtime import AttachedBank, ForwardCall, LayerInputSource, Reads, attach, detach
from lorafuse.train.loop import TrainConfig, train_loop

FORMAT = "lorafuse-instance-encoder"
VERSION = 1
ACTIVATIONS = ("softmax", "tanh")


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
    """A basis of LoRAs attached to a model, weighted per sequence by an :class:`InstanceEncoder`."""

    def __init__(self, model: nn.Module, basis: Mapping[str, LoRA], encoder: InstanceEncoder) -> None:
        self.model, self.encoder = model, encoder
        self.bank: AttachedBank = attach(model, dict(basis))
        self.source = InstanceSource(encoder, model)
        self.bank.set_source(self.source.source)

    @property
    def names(self) -> list[str]:
        return self.bank.names

    def save(
        self,
        path: str | os.PathLike[str],
        basis_paths: Mapping[str, str],
        base_model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = True,
        inputs: OutputInputs = (),
    ) -> Path:
        """Write ``encoder.json`` (config, basis names and folders, base) and ``encoder.safetensors``.

        ``path`` must not be, contain or lie inside a basis LoRA, the base model, the tokenizer
        recorded in ``extra``, nor any of ``inputs`` (training data).
        """
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": asdict(self.encoder.config),
            "hidden_size": int(self.encoder.query.shape[1]),
            "basis": {name: record_path(str(basis_paths[name])) for name in self.names},
            "base_model": record_path(base_model) if base_model else base_model,
            "versions": versions(),
            **finite_or_none(dict(extra or {})),
        }
        if isinstance(meta.get("tokenizer"), str):
            meta["tokenizer"] = record_path(meta["tokenizer"])
        known = [*basis_paths.values(), base_model, (extra or {}).get("tokenizer")]
        with atomic_output_dir(path, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
            write_safetensors(dict(self.encoder.state_dict()), tmp / "encoder.safetensors")
            write_json(meta, tmp / "encoder.json")
        return Path(path)

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
    ``encoder.json`` (wrong types, NaN, an empty basis, ``top_k`` beyond the basis), a missing or
    damaged ``encoder.safetensors``, tensors whose shapes disagree with the description or hold
    NaN/inf. Relative basis and base paths are resolved from the folder, else the current folder.
    """
    folder = Path(path)
    meta_path = folder / "encoder.json"
    raw = read_json_file(meta_path, LorafuseError, what="encoder description")
    if not isinstance(raw, dict):
        raise LorafuseError(f"{meta_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise LorafuseError(f"{folder}: not a lorafuse instance encoder of version {VERSION}")
    meta = parse_model(_EncoderMeta, raw, str(meta_path), error=LorafuseError)
    k, settings = len(meta.basis), meta.config
    if settings.top_k is not None and settings.top_k > k:
        raise LorafuseError(f"{meta_path}: config.top_k is {settings.top_k} but the basis holds {k} LoRAs")
    weights_path = folder / "encoder.safetensors"
    state = read_safetensors(weights_path, require_finite=True)
    expected = {"query": (settings.dim, meta.hidden_size), "keys": (k, settings.dim)}
    for name, shape in expected.items():
        got = tuple(state[name].shape) if name in state else "missing"
        if got != shape:
            raise LorafuseError(f"{weights_path}: {name} is {got}, expected {shape} from encoder.json")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise LorafuseError(f"{weights_path}: unexpected tensor(s) {extra}")
    encoder = InstanceEncoder(meta.hidden_size, k, EncoderConfig(**settings.model_dump()))
    encoder.load_state_dict(state)
    encoder.requires_grad_(False)
    described = dict(raw)
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
