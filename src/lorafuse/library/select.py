"""Choosing k adapters of the catalogue for a task, from a few of its examples.

Candidates are the catalogue's usable PEFT adapters whose every module fits the base model (path
present, a linear layer, the same ``(out, in)``; checked from the stored shapes, without loading
them). Four ways to rank them:

- ``loss``: each adapter's mean token loss on the examples (response tokens only, as training
  counts them: Σ token losses / number of loss tokens over all examples), lowest first. The
  adapters run through the serving pool (:class:`~lorafuse.runtime.AdapterPool`): a group of
  adapters is loaded into one rank table and every forward pass is a batch of (adapter, example)
  rows, each row with its own adapter, so the base model is loaded once and many adapters share
  each forward.
- ``similarity`` (Arrow-style, arXiv 2405.11157): the examples' inputs of each adapted module
  against the adapter's stored direction for that module. For every example ``e`` and module
  ``m`` (``model.layers.3.self_attn.q_proj``), ``x̄_{e,m}`` is the mean over the example's tokens
  of what the base's layer ``m`` takes as input (after the decoder layer's norm for ``q/k/v`` and
  ``gate/up``; the attention output for ``o_proj``; the MLP's activation for ``down_proj``),
  recorded with forward pre-hooks; a module with direction ``v`` (the top right singular vector of
  its ``ΔW``, a unit vector of that same input space) scores ``|cos(x̄_{e,m}, v)|``; the adapter's
  score is the mean over its modules and the examples, highest first. Arrow routes each token by
  ``|⟨v, x_t⟩|``; the mean over tokens first keeps selection over a thousand adapters to one small
  matmul per module.
- ``norm``: the largest ``‖ΔW‖ = sqrt(Σ_modules ‖s·B A‖²_F)`` first.
- ``random``: a seeded draw per adapter, from the seed and the SHA-256 of the adapter's files,
  so one adapter's draw does not change as others are added to or removed from the catalogue.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse._data import Encoded, collate
from lorafuse._io import read_json_file, resolve_recorded_path, versions, write_text_atomic
from lorafuse.adapters import load_lora
from lorafuse.adapters.lora import LoRA
from lorafuse.adapters.validate import linear_shape
from lorafuse.errors import LorafuseError
from lorafuse.library.catalog import LibraryError, query
from lorafuse.runtime.pool import AdapterPool

BY = ("loss", "similarity", "random", "norm")
HIGHER_IS_BETTER = {"loss": False, "similarity": True, "random": True, "norm": True}
SELECTION_FORMAT = "lorafuse-selection"


@dataclass
class Selection:
    """Candidates ranked by ``by`` (best first), the ones skipped and why."""

    by: str
    ranked: list[dict[str, Any]]  # {"name", "path", "score", ...} best first
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}
    info: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> list[dict[str, Any]]:
        return self.ranked[:k]

    def to_json(self, k: int) -> dict[str, Any]:
        return {
            "format": SELECTION_FORMAT,
            "version": 1,
            "loras": {r["name"]: r["path"] for r in self.top(k)},
            "by": self.by,
            "k": k,
            "higher_is_better": HIGHER_IS_BETTER[self.by],
            "scores": {r["name"]: r["score"] for r in self.ranked},
            "skipped": self.skipped,
            "info": self.info,
            "versions": versions(),
        }


def model_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every layer of ``model`` a LoRA can adapt, by module path."""
    shapes = {}
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            shapes[path] = (shape.out_features, shape.in_features)
    return shapes


def candidates(
    con: sqlite3.Connection,
    shapes: dict[str, tuple[int, int]],
    *,
    targets: Sequence[str] = (),
    rank: tuple[int | None, int | None] = (None, None),
    base: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Usable PEFT adapters matching the filters that fit ``shapes``; and the misfits, with reasons."""
    rows = query(con, base=base, targets=targets, rank=rank, kind="peft", status="ok")
    fit, skipped = [], []
    for row in rows:
        problems = []
        for m in con.execute(
            "SELECT path, in_features, out_features FROM modules WHERE adapter_id = ?", (row["id"],)
        ):
            want = shapes.get(m["path"])
            if want is None:
                problems.append(f"no linear layer {m['path']} in the base")
            elif want != (m["out_features"], m["in_features"]):
                problems.append(
                    f"{m['path']}: the base's layer is (out, in) = {want}, the adapter's "
                    f"({m['out_features']}, {m['in_features']})"
                )
        if problems:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            skipped.append({"name": row["name"], "reason": f"does not fit the base: {problems[0]}{more}"})
        else:
            fit.append(row)
    return fit, skipped


def _entry(row: dict[str, Any], score: float) -> dict[str, Any]:
    return {
        "name": row["name"],
        "path": row["path"],
        "score": score,
        "max_rank": row["max_rank"],
        "targets": row["targets"],
        "total_norm": row["total_norm"],
    }


def _ranked(by: str, rows: list[dict[str, Any]], scores: dict[str, float]) -> list[dict[str, Any]]:
    sign = -1.0 if HIGHER_IS_BETTER[by] else 1.0
    ordered = sorted(
        (r for r in rows if r["name"] in scores), key=lambda r: (sign * scores[r["name"]], r["name"])
    )
    return [_entry(r, scores[r["name"]]) for r in ordered]


# -- random and norm -----------------------------------------------------------------------------
def random_scores(rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
    """A uniform draw in [0, 1) per adapter from ``seed`` and the adapter's SHA-256."""
    return {
        r["name"]: int(hashlib.sha256(f"{seed}:{r['sha256']}".encode()).hexdigest()[:15], 16) / 16**15
        for r in rows
    }


def norm_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {r["name"]: float(r["total_norm"]) for r in rows}


# -- similarity ----------------------------------------------------------------------------------
@torch.no_grad()
def module_input_means(
    model: nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    paths: Sequence[str],
    *,
    batch_size: int = 8,
) -> dict[str, Tensor]:
    """``{path: (E, in)}``: per module ``path`` of ``model`` and example ``e``, the mean over the
    example's tokens of the module's input, as the base computes it (forward pre-hooks)."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise LibraryError(f"no module {missing[0]} in the base model ({len(missing)} missing)")
    device = next(model.parameters()).device
    sums: dict[str, list[Tensor]] = {p: [] for p in paths}
    mask = torch.zeros(0)

    def recorder(path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if x.dim() == 2 and x.shape[0] == mask.numel():  # flattened (B·T, in) inputs
                x = x.view(*mask.shape, -1)
            if x.shape[:2] != mask.shape:
                raise LibraryError(f"{path}: input of shape {tuple(x.shape)}, expected (batch, tokens, in)")
            weights = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            sums[path].append(((x * weights).sum(1) / weights.sum(1)).float().cpu())  # (B, in)

        return hook

    handles = [modules[p].register_forward_pre_hook(recorder(p)) for p in paths]
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            mask = batch["attention_mask"].to(device)  # (B, T)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return {p: torch.cat(chunks) for p, chunks in sums.items() if chunks}


def direction_paths(con: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[str]:
    """The module paths of ``rows``' adapters that have a stored direction."""
    ids = [row["id"] for row in rows]
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        found.update(
            r[0]
            for r in con.execute(
                "SELECT DISTINCT path FROM modules WHERE direction IS NOT NULL "
                f"AND adapter_id IN ({', '.join('?' for _ in part)})",
                part,
            )
        )
    return sorted(found)


def similarity_scores(
    con: sqlite3.Connection,
    rows: list[dict[str, Any]],
    means: dict[str, Tensor],
    *,
    progress: bool = False,
    chunk: int = 4096,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Mean ``|cos(x̄_{e,m}, v_m)|`` over an adapter's modules ``m`` and examples ``e``
    (``means`` from :func:`module_input_means`).

    Directions stream from the catalogue ``chunk`` modules at a time, whatever adapter they
    belong to; per module path, one matmul scores every direction of the chunk against every
    example.
    """
    unit = {p: m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12) for p, m in means.items()}  # (E, in)
    position = {row["id"]: i for i, row in enumerate(rows)}
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.zeros(len(rows), dtype=torch.long)
    cursor = con.execute("SELECT adapter_id, path, direction FROM modules WHERE direction IS NOT NULL")
    bar = tqdm(desc="similarity", unit="module", disable=not progress, leave=False)
    while batch := cursor.fetchmany(chunk):
        bar.update(len(batch))
        by_path: dict[str, list[tuple[int, bytes]]] = {}
        for adapter_id, path, blob in batch:
            if adapter_id in position and path in unit and len(blob) == 2 * unit[path].shape[1]:
                by_path.setdefault(path, []).append((position[adapter_id], blob))
        for path, kept in by_path.items():
            owner = torch.tensor([i for i, _ in kept])  # (M,)
            raw = bytearray(b"".join(blob for _, blob in kept))
            directions = torch.frombuffer(raw, dtype=torch.float16).view(len(kept), -1).float()  # (M, in)
            score = (directions @ unit[path].T).abs().mean(1).double()  # (M, E) → (M,)
            sums.index_add_(0, owner, score)
            counts.index_add_(0, owner, torch.ones_like(owner))
    bar.close()
    scores, skipped = {}, []
    for i, row in enumerate(rows):
        if counts[i] == 0:
            skipped.append(
                {"name": row["name"], "reason": "no module with a direction whose input was recorded"}
            )
        else:
            scores[row["name"]] = float(sums[i] / counts[i])
    return scores, skipped


# -- loss ----------------------------------------------------------------------------------------
def _row_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: sum of next-token losses over labelled positions, and their number."""
    targets = labels[:, 1:]  # (B, T-1)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )  # (B, T-1)
    return losses.sum(1), (targets != -100).sum(1)


@torch.no_grad()
def loss_scores(
    model: nn.Module,
    rows: list[dict[str, Any]],
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 16,
    group: int = 16,
    loader: Callable[..., LoRA] | None = None,
    progress: bool = False,
    with_base: bool = True,
) -> tuple[dict[str, float], list[dict[str, str]], float | None]:
    """Mean token loss of every adapter on ``examples``, through one serving pool.

    Adapters are loaded ``group`` at a time into the pool; the (adapter, example) pairs of a group
    run as batches of ``batch_size`` rows, each row with its own adapter, in adapter order (so a
    batch holds as few adapters as the number of examples allows: with 4 examples and 16 rows,
    4 adapters share each forward; with more examples than rows, one adapter fills a batch and
    no rank is computed for a row that does not use it); then the group is evicted, so memory
    holds at most ``group`` adapters. Adapters are grouped by their target modules and each group
    gets a fresh pool: a pool wraps every layer any of its adapters adapts, so a q,v adapter
    never pays for the MLP layers of another group's all-linear adapters. Returns the losses, the
    adapters that could not be loaded (with the reason) and the base model's loss on the same
    examples (``with_base``, else None).
    """
    load = loader or load_lora
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda e: -len(examples[e][0]))  # similar lengths batch together
    pool = AdapterPool(model, initial_rows=256)
    rows = sorted(rows, key=lambda r: (r.get("targets") or [], r.get("max_rank") or 0, r["name"]))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []

    def run(pairs: list[tuple[str | None, int]]) -> None:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = collate([examples[e] for _, e in chunk], pad_id)
            plan = pool.plan([[(name, 1.0)] if name is not None else [] for name, _ in chunk])
            with pool.use(plan):
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
            total, count = _row_losses(logits, batch["labels"].to(device))
            for (name, _), t, c in zip(chunk, total.tolist(), count.tolist(), strict=True):
                key = name if name is not None else ""
                sums[key] = sums.get(key, 0.0) + t
                counts[key] = counts.get(key, 0) + int(c)

    try:
        if with_base:
            run([(None, e) for e in order])  # the base model, for reference
        bar = tqdm(total=len(rows), desc="loss", unit="adapter", disable=not progress, leave=False)
        start = 0
        while start < len(rows):
            targets = rows[start].get("targets")
            stop = start + 1
            while stop < len(rows) and stop - start < group and rows[stop].get("targets") == targets:
                stop += 1
            pool.detach()
            pool = AdapterPool(model, initial_rows=256)
            names = []
            for row in rows[start:stop]:
                try:
                    pool.add(row["name"], load(row["path"]))
                    names.append(row["name"])
                except LorafuseError as exc:  # changed or removed since it was indexed
                    skipped.append({"name": row["name"], "reason": str(exc)})
            run([(name, e) for name in names for e in order])
            for name in names:
                pool.remove(name)
            bar.update(stop - start)
            start = stop
        bar.close()
    finally:
        pool.detach()
    base = sums.pop("") / max(counts.pop(""), 1) if with_base else None
    losses = {name: sums[name] / max(counts[name], 1) for name in sums}
    return losses, skipped, base


# -- the whole selection -------------------------------------------------------------------------
def select(
    con: sqlite3.Connection,
    by: str,
    *,
    model: nn.Module | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
    examples: Sequence[Encoded] = (),
    pad_id: int = 0,
    seed: int = 0,
    targets: Sequence[str] = (),
    rank: tuple[int | None, int | None] = (None, None),
    batch_size: int = 16,
    group: int = 16,
    progress: bool = False,
    loader: Callable[..., LoRA] | None = None,
) -> Selection:
    """Rank the catalogue's candidates for ``model`` by ``by`` (see the module docstring).

    ``shapes`` (from :func:`model_shapes`) is enough for ``random`` and ``norm``; ``loss`` and
    ``similarity`` need ``model`` and the encoded ``examples``.
    """
    if by not in BY:
        raise LibraryError(f"--by {by!r}: choose one of {', '.join(BY)}")
    if shapes is None:
        if model is None:
            raise LibraryError("selection needs the base model (or its layer shapes)")
        shapes = model_shapes(model)
    rows, skipped = candidates(con, shapes, targets=targets, rank=rank)
    info: dict[str, Any] = {"candidates": len(rows), "seed": seed}
    if by in ("loss", "similarity"):
        if model is None or not examples:
            raise LibraryError(f"--by {by} needs the base model and at least one example")
        info["examples"] = len(examples)
    if by == "random":
        scores = random_scores(rows, seed)
    elif by == "norm":
        scores = norm_scores(rows)
    elif by == "similarity":
        assert model is not None
        paths = direction_paths(con, rows)
        means = module_input_means(model, examples, pad_id, paths, batch_size=batch_size)
        scores, more = similarity_scores(con, rows, means, progress=progress)
        skipped += more
    else:
        assert model is not None
        scores, more, base_loss = loss_scores(
            model,
            rows,
            examples,
            pad_id,
            batch_size=batch_size,
            group=group,
            loader=loader,
            progress=progress,
        )
        skipped += more
        info["base_loss"] = base_loss
    scores = {n: s for n, s in scores.items() if math.isfinite(s)}
    return Selection(by, _ranked(by, rows, scores), skipped, info)


def write_selection(selection: Selection, path: str | os.PathLike[str], k: int) -> Path:
    """Write ``selection.json`` (``{"loras": {name: path}, "by", "scores", ...}``) atomically."""
    import json

    return write_text_atomic(path, json.dumps(selection.to_json(k), indent=2) + "\n", what="--out")


def read_selection(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The ``{name: folder}`` of a ``selection.json`` (what ``--lora @selection.json`` stands for).

    Relative folders are taken from the file's own folder. Raises :class:`LibraryError` for a
    file that is not a selection.
    """
    file = Path(path)
    raw = read_json_file(file, LibraryError, what="selection")
    loras = raw.get("loras") if isinstance(raw, dict) else None
    if not isinstance(loras, dict) or not loras:
        raise LibraryError(
            f'{file}: not a selection: it needs "loras": {{name: folder, ...}} with one LoRA or more'
        )
    out = {}
    for name, folder in loras.items():
        if not isinstance(folder, str) or not folder:
            raise LibraryError(f"{file}: loras.{name}: the folder must be a non-empty string")
        out[str(name)] = Path(resolve_recorded_path(folder, file.parent))
    return out
