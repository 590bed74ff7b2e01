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

The launch line makes vLLM read prompts as lorafuse does. lorafuse prompts a model with
``<s> text`` (the tokenizer's BOS, where it has one: :func:`lorafuse._data.encode_prompt`), while
vLLM tokenizes a text prompt with the tokenizer's own special tokens, which for many tokenizers
(the skill world's among them) add no BOS. Where the two differ, the export writes a copy of the
tokenizer whose post-processor adds exactly lorafuse's BOS (``tokenizer/``) and the launch line
passes it with ``--tokenizer``; a tokenizer kept apart from the base (the skill world's
``tokenizer/`` beside ``base/``) is passed the same way. ``--dtype`` is lorafuse serve's default,
``float32`` (vLLM's ``auto`` runs float32 checkpoints in bfloat16 on CPU and float16 on GPU).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafuse._data import encode_prompt
from lorafuse._hf import load_tokenizer
from lorafuse._io import atomic_output_dir
from lorafuse.adapters import LoRA, save_lora
from lorafuse.errors import LorafuseError
from lorafuse.merging import merge
from lorafuse.serve.compose import Composition, RequestError, Resolver
from lorafuse.serve.registry import Registry
from lorafuse.serve.vllm import VLLM_MAX_RANKS, Writer

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_LORAS = 16  # vLLM's --max-loras: LoRA slots of the batch (each holds one adapter's factors)
VLLM_DTYPES = ("float32", "bfloat16", "float16", "auto")
# A text whose encoding shows the special tokens a tokenizer adds around a prompt.
PROBE = "the answer is 42 ."


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
    tokenizer: str | None = None  # vLLM's --tokenizer (None: the base folder's own)
    tokenizer_how: str = ""  # "the base's", "copied with <s> added", ...
    dtype: str = "float32"

    @property
    def adapters(self) -> list[ExportedItem]:
        return [i for i in self.items if i.exported_as == "adapter"]

    @property
    def max_loras(self) -> int:
        """vLLM's ``--max-loras``: one slot more than the adapters, at most :data:`MAX_LORAS`.

        vLLM's CPU build (0.32) gathers each row's LoRA with its slot index and a row without a
        LoRA has index -1: a base-model request batched with LoRA requests gets the *last* slot's
        LoRA. A spare slot that is never filled keeps those rows on the base; with more than
        ``MAX_LORAS - 1`` adapters every slot fills (vLLM on GPU skips index -1).
        """
        return min(len(self.adapters) + 1, MAX_LORAS)

    def launch(self) -> str:
        """The command line serving the exported adapters with vLLM's OpenAI server."""
        args = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", self.base]
        if self.tokenizer:
            args += ["--tokenizer", self.tokenizer]
        args += ["--dtype", self.dtype]
        if self.adapters:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
            args += ["--max-loras", str(self.max_loras), "--lora-modules"]
            args += [f"{i.name}={self.out / str(i.folder)}" for i in self.adapters]
        return shlex.join(args)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "max_lora_rank": self.max_lora_rank,
            "tokenizer": self.tokenizer,
            "tokenizer_how": self.tokenizer_how,
            "dtype": self.dtype,
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


def find_tokenizer(base: Path, tokenizer: Path | None = None) -> Path:
    """The tokenizer folder ``lorafuse serve`` would use: ``tokenizer``, else the base folder,
    else a ``tokenizer/`` folder beside it (the skill world's layout)."""
    candidates = [tokenizer] if tokenizer else [base, base.parent / "tokenizer"]
    found = next((c for c in candidates if (c / "tokenizer_config.json").is_file()), None)
    if found is None:
        shown = ", ".join(map(str, candidates))
        raise ExportError(f"no tokenizer in {shown}; pass the tokenizer folder (--tokenizer DIR)")
    return found


def _encodings(folder: Path) -> tuple[list[int], list[int], Any]:
    """(what vLLM sends the model for a text prompt, what lorafuse sends, the tokenizer)."""
    tok = load_tokenizer(folder)
    return list(tok(PROBE)["input_ids"]), encode_prompt(tok, PROBE), tok


def _bos_processor(tok: Any) -> dict[str, Any]:
    """A ``tokenizers`` post-processor adding lorafuse's prompt specials: ``<s>`` or nothing."""
    bos = [] if tok.bos_token_id is None else [tok.bos_token]
    special = {t: {"id": t, "ids": [tok.bos_token_id], "tokens": [t]} for t in bos}

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        head = [{"SpecialToken": {"id": t, "type_id": type_id}} for t in bos]
        return [*head, {"Sequence": {"id": name, "type_id": type_id}}]

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": special,
    }


def _vllm_tokenizer(found: Path, base: Path, tmp: Path, name: str) -> tuple[str | None, str]:
    """vLLM's ``--tokenizer`` (relative to the export folder when written there) and how.

    The tokenizer is used as it is where its own encoding of a text prompt is lorafuse's;
    otherwise a copy in ``tmp / name`` gets a post-processor adding exactly lorafuse's BOS (and
    ``add_bos_token`` / ``add_eos_token`` set to match), and is checked to agree.
    """
    hf_ids, ours, tok = _encodings(found)
    if hf_ids == ours:
        same = found.resolve() == base.resolve()
        return (None, "the base's own") if same else (str(found.resolve()), "used as it is")
    (tmp / name).mkdir()
    for file in found.iterdir():
        if file.is_file():
            shutil.copyfile(file, tmp / name / file.name)
    fast = tmp / name / "tokenizer.json"
    if fast.is_file():
        spec = json.loads(fast.read_text())
        spec["post_processor"] = _bos_processor(tok)
        fast.write_text(json.dumps(spec, ensure_ascii=False) + "\n")
    config_file = tmp / name / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["add_bos_token"] = tok.bos_token_id is not None
    config["add_eos_token"] = False
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    got, ours, _ = _encodings(tmp / name)
    if got != ours:
        raise ExportError(
            f"the tokenizer in {found} encodes a prompt as {got}, lorafuse as {ours}, and a copy with "
            "lorafuse's BOS did not agree either; send vLLM token-id prompts"
        )
    added = f"{tok.bos_token} added" if tok.bos_token_id is not None else "no special tokens"
    return name, f"a copy of {found.name}/ with {added} to a text prompt, as lorafuse does"


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
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    compositions: Mapping[str, Mapping[str, float]] | None = None,
    dense: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> VllmExport:
    """Write every static item of the served ``adapters`` folder (and each named weighted
    composition ``{name: {adapter: weight}}``) under ``out`` as vLLM loads it; see the module
    docstring. ``base`` is the base model folder (the launch line's ``--model``; dense deltas are
    added to its weights); ``tokenizer`` its tokenizer folder (default: as ``lorafuse serve``
    finds it); ``dtype`` vLLM's ``--dtype``. ``out`` must not be, contain or lie inside
    ``adapters`` or ``base``. Writes ``out/export.json`` (the items, the reasons for those not
    exported, the tokenizer, the launch line).
    """
    from lorafuse.compress import decompress, load_compressed

    if dtype not in VLLM_DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(VLLM_DTYPES)}")
    found = find_tokenizer(Path(base), Path(tokenizer) if tokenizer else None)
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
        taken = {i.name for i in items}
        name = next(n for n in ("tokenizer", *(f"tokenizer-{k}" for k in range(1, 99))) if n not in taken)
        written, how = _vllm_tokenizer(found, Path(base), tmp, name)
        if written == name:
            written = str(Path(out).resolve() / name)
        export = VllmExport(
            Path(out).resolve(), str(Path(base).resolve()), items, max_rank, written, how, dtype
        )
        (tmp / "export.json").write_text(json.dumps(export.to_json(), indent=2) + "\n")
    return export


def adapter_writer(registry: Registry) -> Writer:
    """What ``lorafuse serve --engine vllm`` materialises a composition with: this module's writer
    (a PEFT adapter copied, a composition or static fusion as one exact ``cat`` adapter, a
    low-rank delta as its factors) into a work folder, returning ``(folder, rank)``; what is not
    exported is a :class:`~lorafuse.serve.compose.RequestError` (400) with its reason."""

    def write(composition: Composition, work: Path) -> tuple[Path, int]:
        entry = registry.get(composition.label)
        plain = (
            entry is not None and entry.kind == "adapter" and [p.weight for p in composition.parts] == [1.0]
        )
        name, kind = (composition.label, "adapter") if plain else ("adapter", "composition")
        item = _export_one(name, kind, composition, registry, work)
        if item.exported_as != "adapter":
            raise RequestError(400, f"`{composition.label}` cannot be served on vLLM: {item.reason}")
        return work / name, int(item.rank or 0)

    return write


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
