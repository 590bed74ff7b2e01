"""Export what ``lorafuse serve`` serves as folders vLLM loads (``--enable-lora --lora-modules``).

vLLM serves one PEFT adapter per request. Every *static* item of an adapters folder is one
adapter exactly: a weighted composition ``Σ_i w_i ΔW_i`` is the ``cat`` of the LoRAs' ranks with
the weights folded in (``B = [B_1 … B_k]``, ``A = [w_1 s_1 A_1; …; w_k s_k A_k]``, rank ``Σ r_i``),
and a static fusion (``average``, LoraHub) is such a composition. So::

    item                                   exported as
    PEFT adapter                           its folder's PEFT files, as they are
    static fusion, composition (--compose) an exact ``cat`` adapter (rank Σ r_i)
    low-rank compressed delta              a PEFT adapter of its factors
    dense compressed delta (BitDelta, RTN) a full model ``base + ΔŴ`` (only with ``dense=True``)
    LoRA-Flow, learned CAT (cat-weights)   not exported: per-token / per-module weights need
                                           lorafuse's engine

and a launch line for vLLM's OpenAI server. vLLM's ``--max-lora-rank`` takes one of
:data:`VLLM_MAX_RANKS`; the largest exported rank is rounded up to the next one, and an adapter
above the largest is listed as not exported (merge it with ``svd`` to a lower rank first).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafuse._io import atomic_output_dir
from lorafuse.adapters import LoRA, save_lora
from lorafuse.errors import LorafuseError
from lorafuse.merging import merge
from lorafuse.serve.compose import Composition, RequestError, Resolver
from lorafuse.serve.registry import Registry

# The ranks vLLM's LoRAConfig accepts for --max-lora-rank (vLLM 0.6 onward).
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(LorafuseError, ValueError):
    """An export that cannot be written (a bad composition, a missing base for dense deltas)."""


@dataclass
class ExportedItem:
    """One item of the adapters folder (or one ``--compose``) and what became of it."""

    name: str
    kind: str  # adapter | fusion | compressed | composition
    exported_as: str | None  # "adapter" (a PEFT folder) | "model" (a full model) | None: not exported
    folder: str | None = None  # relative to the export folder
    rank: int | None = None  # the largest module rank of an exported adapter
    how: str = ""  # "copied", "cat of a, b with weights 0.5, 0.5", ...
    reason: str | None = None  # why it was not exported
    parts: dict[str, float] = field(default_factory=dict)  # LoRA name → weight of a composition


@dataclass
class VllmExport:
    """What :func:`export_vllm` wrote: the items, vLLM's ``--max-lora-rank`` and a launch line."""

    out: Path
    base: str
    items: list[ExportedItem]
    max_lora_rank: int | None

    @property
    def adapters(self) -> list[ExportedItem]:
        return [i for i in self.items if i.exported_as == "adapter"]

    def launch(self) -> str:
        """The command line serving the exported adapters with vLLM's OpenAI server."""
        args = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", self.base]
        if self.adapters:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
            args += ["--max-loras", str(min(len(self.adapters), 16)), "--lora-modules"]
            args += [f"{i.name}={self.out / str(i.folder)}" for i in self.adapters]
        return shlex.join(args)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "max_lora_rank": self.max_lora_rank,
            "launch": self.launch(),
            "items": [asdict(i) for i in self.items],
        }


def vllm_max_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (``None``: none does)."""
    return next((r for r in VLLM_MAX_RANKS if r >= rank), None)


def _max_rank(lora: LoRA) -> int:
    return max(m.A.shape[0] for m in lora.modules.values())


def _loras(composition: Composition) -> tuple[list[LoRA], list[float]]:
    try:
        return [part.load() for part in composition.parts], [part.weight for part in composition.parts]
    except RequestError as exc:
        raise ExportError(str(exc)) from None


def _resolve(resolver: Resolver, model: str, compose: object = None) -> Composition:
    try:
        return resolver.resolve(model, compose)
    except RequestError as exc:
        where = f"--compose {model}" if compose is not None else model
        raise ExportError(f"{where}: {exc}") from None


def export_vllm(
    adapters: str | Path,
    out: str | Path,
    *,
    base: str | Path,
    compositions: Mapping[str, Mapping[str, float]] | None = None,
    dense: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> VllmExport:
    """Write every static item of the served ``adapters`` folder (and each named weighted
    composition ``{name: {adapter: weight}}``) under ``out`` as vLLM loads it; see the module
    docstring. ``base`` is the base model folder (the launch line's ``--model``; dense deltas are
    added to its weights). ``out`` must not be, contain or lie inside ``adapters`` or ``base``.
    Writes ``out/export.json`` (the items, the reasons for those not exported, the launch line).
    """
    from lorafuse.compress import decompress, load_compressed

    registry = Registry(adapters)
    resolver = Resolver(registry, base_name="__base__")
    compositions = dict(compositions or {})
    clash = sorted(set(compositions) & {e.name for e in registry.entries()})
    if clash:
        raise ExportError(f"--compose names {clash} are already items of {adapters}; choose other names")
    items: list[ExportedItem] = []
    with atomic_output_dir(out, overwrite=overwrite, inputs={"adapters": adapters, "base": base}) as tmp:
        work: list[tuple[str, str, Composition]] = []
        for entry in registry.entries():
            if entry.kind == "compressed" and dense:
                delta = load_compressed(entry.path)
                if not delta.factored:
                    decompress(delta, base, tmp / entry.name, progress=progress)
                    items.append(ExportedItem(entry.name, entry.kind, "model", entry.name, how="base + ΔŴ"))
                    continue
            try:
                work.append((entry.name, entry.kind, _resolve(resolver, entry.name)))
            except ExportError as exc:
                items.append(ExportedItem(entry.name, entry.kind, None, reason=str(exc)))
        for name, compose in compositions.items():
            work.append((name, "composition", _resolve(resolver, "__base__", dict(compose))))
        for name, kind, composition in work:
            items.append(_export_one(name, kind, composition, registry, tmp))
        adapters_out = [i for i in items if i.exported_as == "adapter"]
        max_rank = vllm_max_rank(max((i.rank or 0) for i in adapters_out)) if adapters_out else None
        export = VllmExport(Path(out).resolve(), str(Path(base).resolve()), items, max_rank)
        (tmp / "export.json").write_text(json.dumps(export.to_json(), indent=2) + "\n")
    return export


def _export_one(
    name: str, kind: str, composition: Composition, registry: Registry, tmp: Path
) -> ExportedItem:
    """One item: copied, ``cat``-merged or refused with the reason."""
    if composition.dynamic:
        assert composition.fusion is not None
        method = composition.fusion.method
        return ExportedItem(
            name,
            kind,
            None,
            reason=f"a {method} fusion weights its LoRAs per token or per module: "
            "serve it with lorafuse's engine",
        )
    try:
        loras, weights = _loras(composition)
    except ExportError as exc:
        return ExportedItem(name, kind, None, reason=str(exc))
    parts = {lora.name or f"part{i}": w for i, (lora, w) in enumerate(zip(loras, weights, strict=True))}
    entry = registry.get(name)
    if kind == "adapter" and entry is not None and weights == [1.0]:
        (tmp / name).mkdir()
        for file in PEFT_FILES:
            shutil.copyfile(entry.path / file, tmp / name / file)
        return ExportedItem(name, kind, "adapter", name, _max_rank(loras[0]), "copied")
    if len(loras) == 1 and weights == [1.0]:
        lora, how = loras[0], "its factors as a PEFT adapter"
    else:
        lora = merge(loras, "cat", weights, union=True, allow_different_bases=True, progress=False)
        shown = ", ".join(f"{n} {w:g}" for n, w in parts.items())
        how = f"cat of {shown} (exact, rank Σ r_i)"
    rank = _max_rank(lora)
    if vllm_max_rank(rank) is None:
        return ExportedItem(
            name,
            kind,
            None,
            rank=rank,
            parts=parts,
            reason=f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_RANKS[-1]}; "
            "merge it with `lorafuse merge --method svd --rank R` first",
        )
    save_lora(lora, tmp / name)
    return ExportedItem(name, kind, "adapter", name, rank, how, parts=parts)
