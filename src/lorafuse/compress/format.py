"""The compressed-delta folder: packed tensors in safetensors + a versioned JSON description.

Layout::

    <dir>/compressed.json       format, version, method, settings, budget, per-module kind/shape/
                                bytes/metadata, the tensors kept from the base, totals, versions
    <dir>/delta.safetensors     every module's packed tensors, keys ``<module path>.<part>``
    <dir>/other.safetensors     plain fp32 deltas of non-linear tensors (only when requested)

The bytes of ``delta.safetensors``' data section equal the sum of the modules' ``nbytes``. The
folder is written atomically (:meth:`CompressedDelta.save`); reading it (:meth:`CompressedDelta.load`)
checks the header through the artefact protocol (:mod:`lorafuse._artefact`) and never runs pickle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints
from torch import Tensor, nn

from lorafuse._artefact import Format, artefact_dir, read_header, register_format, write_header
from lorafuse._checks import NonNegativeInt, PositiveInt, StrictFiniteFloat, finite_or_none, parse_model
from lorafuse._io import OutputInputs, combine_inputs, read_safetensors, write_safetensors
from lorafuse.adapters.lora import LoRA, LoRAModule
from lorafuse.compress.quantize import QuantizedMatrix
from lorafuse.compress.types import KINDS, CompressedModule, DenseQuant, HalfFactors, QuantFactors
from lorafuse.errors import ArtefactError, CompressError, LorafuseError

FORMAT = "lorafuse-compressed-delta"
VERSION = 1
META = "compressed.json"
DELTA = "delta.safetensors"
OTHER = "other.safetensors"


class CompressedFormatError(CompressError, ArtefactError):
    """A compressed-delta folder that cannot be read (its header, its description, its tensors)."""


COMPRESSED_FORMAT = register_format(
    Format(kind=FORMAT, version=VERSION, header=META, noun="compressed delta", error=CompressedFormatError)
)


@dataclass(frozen=True)
class _Packed:
    kind: str
    shape: tuple[int, int]
    nbytes: int
    factored: bool
    meta: dict[str, Any]
    tensors: dict[str, Tensor]  # the packed tensors written to ``delta.safetensors``


class PackedModules(Mapping[str, CompressedModule]):
    """Compressed modules held as the packed tensors they are written as, rebuilt on access.

    A module in memory keeps its codes unpacked (one byte per 2-bit code, one per sign bit);
    held packed, a whole checkpoint's delta costs what it costs on disk (``budget × fp16``), so
    compressing layer by layer does not accumulate 4–8× the output. ``packed[path]`` rebuilds
    the module (a fresh object each time, on the CPU).
    """

    def __init__(self) -> None:
        self._items: dict[str, _Packed] = {}

    def add(self, path: str, module: CompressedModule, tensors: dict[str, Tensor] | None = None) -> None:
        """Hold ``module`` packed: ``tensors`` if given (read from its file), else its own packing."""
        packed = module.to_tensors(path) if tensors is None else tensors
        self._items[path] = _Packed(
            module.kind,
            tuple(module.shape),
            module.nbytes,
            module.factored,
            module.meta(),
            {k: t.cpu() for k, t in packed.items()},
        )

    def packed(self, path: str) -> _Packed:
        return self._items[path]

    def __getitem__(self, path: str) -> CompressedModule:
        item = self._items[path]
        return KINDS[item.kind].from_tensors(item.tensors, path, item.meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _records(modules: Mapping[str, CompressedModule]) -> Iterator[tuple[str, Any]]:
    """``(path, record)`` with ``kind``/``shape``/``nbytes``/``factored``, without unpacking."""
    if isinstance(modules, PackedModules):
        yield from ((p, modules.packed(p)) for p in modules)
    else:
        yield from modules.items()


@dataclass
class CompressedDelta:
    """A compressed fine-tuning delta: one :class:`CompressedModule` per linear layer."""

    method: str
    params: dict[str, Any]
    budget: float
    modules: Mapping[str, CompressedModule]  # module path (weight name without ``.weight``)
    other: dict[str, Tensor] = field(default_factory=dict)  # tensor name → plain fp32 delta
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed linear layers (scales, zero points, permutations included)."""
        return sum(m.nbytes for _, m in _records(self.modules))

    @property
    def fp16_nbytes(self) -> int:
        """Bytes of the same deltas in fp16: ``2 · out · in`` per module."""
        return sum(2 * m.shape[0] * m.shape[1] for _, m in _records(self.modules))

    @property
    def factored(self) -> bool:
        return all(m.factored for _, m in _records(self.modules))

    def to_lora(self, name: str | None = None, *, model: nn.Module | None = None) -> LoRA:
        """The delta as a LoRA (``A = V̂ᵀ``, ``B = Û diag(S)``, scale 1) for :func:`lorafuse.attach`.

        Only low-rank kinds have factors; a ``bitdelta``/``rtn`` delta is dense (apply it with
        :func:`lorafuse.compress.apply_delta` or :func:`lorafuse.compress.decompress`).
        Non-linear tensors stored as plain deltas are not part of the LoRA (``apply_delta(...,
        linear=False)`` adds them to the model). With ``model``, every module must also be a
        linear layer of it (:func:`lora_refusal`: a mixture of experts' per-expert weights are
        not), else one :class:`CompressError` naming them.
        """
        records = {p: (m.kind, tuple(m.shape)) for p, m in _records(self.modules)}
        reason = lora_refusal(records, self.method, linear_layers(model) if model is not None else None)
        if reason is not None:
            raise CompressError(reason)
        modules = {}
        for path, m in self.modules.items():
            B, A = m.factors()  # (out, r), (r, in)
            modules[path] = LoRAModule(A, B, 1.0)
        return LoRA(
            modules, self.info.get("base"), name or f"{self.method}", {"source": self.info.get("path")}
        )

    def save(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, inputs: OutputInputs = ()
    ) -> Path:
        """Write the folder atomically (:func:`save_compressed`); the folder it was loaded from,
        the base and the fine-tuned model it records are never written over."""
        own = self.info.get("path")
        return save_compressed(
            self, path, overwrite=overwrite, inputs=combine_inputs(inputs, [own] if own else [])
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressedDelta:
        """Read a compressed-delta folder (:func:`load_compressed`)."""
        return load_compressed(path)


EXPERT_RE = re.compile(r"\.experts\.\d+\.")  # a per-expert weight of a MoE checkpoint
SHOWN = 3  # module names a refusal shows


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of every layer of ``model`` a LoRA can adapt (``nn.Linear``,
    GPT-2 ``Conv1D``; a layer wrapped by a serving bank counts as the layer)."""
    from lorafuse.adapters.validate import linear_shape

    found = {}
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            found[path] = (shape.out_features, shape.in_features)
    return found


def lora_refusal(
    modules: Mapping[str, tuple[str, tuple[int, ...]]],
    method: str,
    linear: Mapping[str, tuple[int, int]] | None = None,
) -> str | None:
    """Why a delta with ``modules`` (``{path: (kind, (out, in))}``) cannot be applied as a LoRA,
    or ``None`` when it can.

    Dense kinds (BitDelta signs, RTN) have no factors. With ``linear`` (the served model's
    :func:`linear_layers`), every module must be one of them with the same shape: a delta is
    served whole or not at all, never with some of its modules left out (its outputs would not
    be the fine-tune's). Checkpoints of mixtures of experts store each expert's projections as
    2-D weights (``...experts.3.w1``), while transformers holds them fused in 3-D parameters
    (``mlp.experts.gate_up_proj``) that a LoRA cannot adapt; such deltas are refused here and
    served after ``lorafuse decompress`` as a base of their own.
    """
    dense = sorted({kind for kind, _ in modules.values() if not KINDS[kind].factored})
    if dense:
        return (
            f"a {method} delta is dense ({', '.join(dense)}): it has no low-rank factors to serve on "
            "the fly; use apply_delta(model, delta) or `lorafuse decompress`"
        )
    if linear is None:
        return None
    problems = []
    for path, (_, shape) in modules.items():
        if path not in linear:
            problems.append(path)
        elif tuple(linear[path]) != tuple(shape):
            problems.append(f"{path} ({tuple(shape)}, the layer is {tuple(linear[path])})")
    if not problems:
        return None
    experts = sum(1 for p in problems if EXPERT_RE.search(p))
    shown = ", ".join(problems[:SHOWN]) + (
        f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    )
    why = (
        f"; {experts} are per-expert weights of a mixture of experts, which transformers holds fused "
        "in 3-D expert parameters that a LoRA cannot adapt"
        if experts
        else ""
    )
    return (
        f"{len(problems)} of its {len(modules)} compressed modules are not linear layers of the served "
        f"model, so it cannot be applied as a LoRA: {shown}{why}. Write the fine-tuned model with "
        "`lorafuse decompress` and serve that as the base"
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
    for path, m in _records(delta.modules):
        tensors |= m.tensors if isinstance(m, _Packed) else m.to_tensors(path)
        meta = m.meta if isinstance(m, _Packed) else m.meta()
        modules[path] = {"kind": m.kind, "shape": list(m.shape), "nbytes": m.nbytes, "meta": meta}
    known = {"base": delta.info.get("base"), "finetuned": delta.info.get("finetuned")}
    with artefact_dir(out, overwrite=overwrite, inputs=combine_inputs(known, inputs)) as tmp:
        write_safetensors(tensors, tmp / DELTA)
        if delta.other:
            write_safetensors(delta.other, tmp / OTHER)
        fields = {
            "method": delta.method,
            "params": delta.params,
            "budget": delta.budget,
            "nbytes": delta.nbytes,
            "fp16_nbytes": delta.fp16_nbytes,
            "modules": modules,
            "other": sorted(delta.other),
            "info": finite_or_none({k: v for k, v in delta.info.items() if k != "path"}),
        }
        write_header(tmp, FORMAT, VERSION, fields)
    return Path(out)


class _QuantRecord(BaseModel):
    """A quantized matrix's description: shape, bit width, group size."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rows: PositiveInt
    cols: PositiveInt
    bits: Annotated[StrictInt, Field(ge=1, le=8)]
    group_size: PositiveInt


class _QuantFactorsRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    segments: list[tuple[PositiveInt, Annotated[StrictInt, Field(ge=1, le=8)]]]
    V: Annotated[list[_QuantRecord], Field(min_length=1)]
    U: Annotated[list[_QuantRecord], Field(min_length=1)]
    estimated_error: StrictFiniteFloat | None = None
    label: Annotated[str, Field(max_length=64)] | None = None  # the schedule that made it


class _RankRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    rank: PositiveInt
    label: Annotated[str, Field(max_length=64)] | None = None  # "low-rank", "full-rank"


class _SignRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    rows: PositiveInt
    cols: PositiveInt


_KIND_RECORDS: dict[str, type[BaseModel]] = {
    "quant_factors": _QuantFactorsRecord,
    "half_factors": _RankRecord,
    "sign": _SignRecord,
    "dense_quant": _QuantRecord,
}


class _ModuleRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: Literal[tuple(KINDS)]  # type: ignore[valid-type]
    shape: tuple[PositiveInt, PositiveInt]
    nbytes: NonNegativeInt | None = None
    meta: dict[str, Any]


class _CompressedMeta(BaseModel):
    """What :func:`load_compressed` needs from ``compressed.json`` (format and version checked first)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    method: Annotated[str, StringConstraints(strict=True, min_length=1)]
    params: dict[str, Any] = {}
    budget: Annotated[StrictFiniteFloat, Field(gt=0, le=1)]
    modules: Annotated[dict[str, _ModuleRecord], Field(min_length=1)]
    other: list[Annotated[str, StringConstraints(strict=True)]] = []
    info: dict[str, Any] = {}


def _check_quantized(q: QuantizedMatrix, where: str) -> None:
    """Scales and zero points per row and group, a permutation that is one: else ``CompressError``."""
    rows, cols = q.shape
    groups = -(-cols // q.group_size)
    if tuple(q.scales.shape) != (rows, groups) or not q.scales.is_floating_point():
        raise CompressedFormatError(
            f"{where}: scales are {tuple(q.scales.shape)} {q.scales.dtype}, "
            f"expected ({rows}, {groups}) floats"
        )
    if q.perm is not None and (
        tuple(q.perm.shape) != (cols,)
        or not torch.equal(torch.sort(q.perm.long()).values, torch.arange(cols))
    ):
        raise CompressedFormatError(f"{where}: perm is not a permutation of the {cols} columns")


def _check_module(module: CompressedModule, shape: tuple[int, int], where: str) -> None:
    """The rebuilt module has the recorded shape and consistent parts (cheap, no ΔW formed)."""
    if isinstance(module, HalfFactors) and (
        module.B.ndim != 2 or module.A.ndim != 2 or module.B.shape[1] != module.A.shape[0]
    ):
        raise CompressedFormatError(
            f"{where}: B {tuple(module.B.shape)} and A {tuple(module.A.shape)} are not (out, k), (k, in)"
        )
    if isinstance(module, QuantFactors) and module.S.ndim != 1:
        raise CompressedFormatError(f"{where}: S is {tuple(module.S.shape)}, expected a vector")
    if tuple(module.shape) != shape:
        raise CompressedFormatError(
            f"{where}: the tensors give shape {tuple(module.shape)}, the record says {shape}"
        )
    if isinstance(module, DenseQuant):
        _check_quantized(module.q, where)
    elif isinstance(module, QuantFactors):
        for part in (*module.V, *module.U):
            _check_quantized(part, where)
        r = module.rank
        if sum(v.shape[0] for v in module.V) != r or sum(u.shape[1] for u in module.U) != r:
            raise CompressedFormatError(f"{where}: the factor segments do not add up to the rank {r} of S")
        if any(v.shape[1] != shape[1] for v in module.V) or any(u.shape[0] != shape[0] for u in module.U):
            raise CompressedFormatError(f"{where}: factor segments disagree with the shape {shape}")


def load_compressed(path: str | os.PathLike[str]) -> CompressedDelta:
    """Read a folder written by :func:`save_compressed` (errors name the file and the problem).

    Every problem is one :class:`CompressError` naming the file and field: a missing or malformed
    ``compressed.json`` (wrong types, NaN, unknown kinds, a budget outside (0, 1]), missing or
    damaged tensors, tensors that disagree with the description, NaN/inf scales or factors.
    """
    path = Path(path)
    header = read_header(path, FORMAT)
    meta_path = header.path
    meta = parse_model(_CompressedMeta, header.fields, str(meta_path), error=CompressedFormatError)
    for name, record in meta.modules.items():
        parse_model(
            _KIND_RECORDS[record.kind],
            record.meta,
            f"{meta_path}: modules.{name}.meta",
            CompressedFormatError,
        )
    try:
        tensors = read_safetensors(path / DELTA, require_float=False, require_finite=True)
        other = read_safetensors(path / OTHER, require_finite=True) if meta.other else {}
    except LorafuseError as exc:
        raise CompressedFormatError(str(exc)) from None
    if sorted(other) != sorted(meta.other):
        raise CompressedFormatError(
            f"{path / OTHER}: holds {sorted(other)[:5]}, {META} lists {sorted(meta.other)[:5]}"
        )
    modules = PackedModules()  # held as read: a 7B delta costs its file size, not 4-8× unpacked
    for name, record in meta.modules.items():
        where = f"{path / DELTA}: module {name} ({record.kind})"
        try:
            module = KINDS[record.kind].from_tensors(tensors, name, record.meta)
        except KeyError as exc:
            raise CompressedFormatError(f"{where} is damaged: tensor {exc} is missing") from None
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise CompressedFormatError(f"{where} is damaged: {exc}") from None
        _check_module(module, record.shape, where)
        own = {k: t for k, t in tensors.items() if k.startswith(f"{name}.")}
        modules.add(name, module, own)
        del module
    info = dict(meta.info)
    info["path"] = str(path)
    return CompressedDelta(meta.method, dict(meta.params), meta.budget, modules, other, info)
