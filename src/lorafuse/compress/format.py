"""The compressed-delta folder: packed tensors in safetensors + a versioned JSON description.

Layout::

    <dir>/compressed.json       format, version, method, settings, budget, per-module kind/shape/
                                bytes/metadata, the tensors kept from the base, totals, versions
    <dir>/delta.safetensors     every module's packed tensors, keys ``<module path>.<part>``
    <dir>/other.safetensors     plain fp32 deltas of non-linear tensors (only when requested)

The bytes of ``delta.safetensors``' data section equal the sum of the modules' ``nbytes``. The
folder is written atomically; reading it never runs pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lorafuse._io import (
    OutputInputs,
    atomic_output_dir,
    combine_inputs,
    read_safetensors,
    versions,
    write_json,
    write_safetensors,
)
from lorafuse.adapters.lora import LoRA, LoRAModule
from lorafuse.compress.types import KINDS, CompressedModule
from lorafuse.errors import CompressError

FORMAT = "lorafuse-compressed-delta"
VERSION = 1
META = "compressed.json"
DELTA = "delta.safetensors"
OTHER = "other.safetensors"


@dataclass
class CompressedDelta:
    """A compressed fine-tuning delta: one :class:`CompressedModule` per linear layer."""

    method: str
    params: dict[str, Any]
    budget: float
    modules: dict[str, CompressedModule]  # module path (weight name without ``.weight``)
    other: dict[str, Tensor] = field(default_factory=dict)  # tensor name → plain fp32 delta
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed linear layers (scales, zero points, permutations included)."""
        return sum(m.nbytes for m in self.modules.values())

    @property
    def fp16_nbytes(self) -> int:
        """Bytes of the same deltas in fp16: ``2 · out · in`` per module."""
        return sum(2 * m.shape[0] * m.shape[1] for m in self.modules.values())

    @property
    def factored(self) -> bool:
        return all(m.factored for m in self.modules.values())

    def to_lora(self, name: str | None = None) -> LoRA:
        """The delta as a LoRA (``A = V̂ᵀ``, ``B = Û diag(S)``, scale 1) for :func:`lorafuse.attach`.

        Only low-rank kinds have factors; a ``bitdelta``/``rtn`` delta is dense (apply it with
        :func:`lorafuse.compress.apply_delta` or :func:`lorafuse.compress.decompress`).
        Non-linear tensors stored as plain deltas are not part of the LoRA (``apply_delta(...,
        linear=False)`` adds them to the model).
        """
        dense = sorted({m.kind for m in self.modules.values() if not m.factored})
        if dense:
            raise CompressError(
                f"a {self.method} delta is dense ({', '.join(dense)}): it has no low-rank factors to "
                "serve on the fly; use apply_delta(model, delta) or `lorafuse decompress`"
            )
        modules = {}
        for path, m in self.modules.items():
            B, A = m.factors()  # (out, r), (r, in)
            modules[path] = LoRAModule(A, B, 1.0)
        return LoRA(
            modules, self.info.get("base"), name or f"{self.method}", {"source": self.info.get("path")}
        )


def save_compressed(
    delta: CompressedDelta,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: OutputInputs = (),
) -> Path:
    """Write ``delta`` to the folder ``out`` atomically; returns the folder.

    ``out`` must not be, contain or lie inside the base or fine-tuned model the delta records,
    nor any of ``inputs``.
    """
    tensors: dict[str, Tensor] = {}
    modules: dict[str, Any] = {}
    for path, m in delta.modules.items():
        tensors |= m.to_tensors(path)
        modules[path] = {"kind": m.kind, "shape": list(m.shape), "nbytes": m.nbytes, "meta": m.meta()}
    known = {"base": delta.info.get("base"), "finetuned": delta.info.get("finetuned")}
    with atomic_output_dir(out, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
        write_safetensors(tensors, tmp / DELTA)
        if delta.other:
            write_safetensors(delta.other, tmp / OTHER)
        write_json(
            {
                "format": FORMAT,
                "version": VERSION,
                "method": delta.method,
                "params": delta.params,
                "budget": delta.budget,
                "nbytes": delta.nbytes,
                "fp16_nbytes": delta.fp16_nbytes,
                "modules": modules,
                "other": sorted(delta.other),
                "info": delta.info,
                "versions": versions(),
            },
            tmp / META,
        )
    return Path(out)


def load_compressed(path: str | os.PathLike[str]) -> CompressedDelta:
    """Read a folder written by :func:`save_compressed` (errors name the file and the problem)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CompressError(f"{path}: no {META}; not a compressed delta folder") from None
    except json.JSONDecodeError as exc:
        raise CompressError(f"{path / META}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CompressError(
            f"{path / META}: format {meta.get('format')!r} version {meta.get('version')!r}; this lorafuse "
            f"reads {FORMAT!r} version {VERSION}"
        )
    try:
        tensors = read_safetensors(path / DELTA, require_float=False)
        other = read_safetensors(path / OTHER) if meta["other"] else {}
    except Exception as exc:
        raise CompressError(f"{path}: {exc}") from None
    modules: dict[str, CompressedModule] = {}
    for name, m in meta["modules"].items():
        try:
            modules[name] = KINDS[m["kind"]].from_tensors(tensors, name, m["meta"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CompressError(
                f"{path / DELTA}: module {name} ({m.get('kind')}) is damaged: {exc}"
            ) from None
    info = dict(meta.get("info", {}))
    info["path"] = str(path)
    return CompressedDelta(meta["method"], meta["params"], meta["budget"], modules, other, info)
