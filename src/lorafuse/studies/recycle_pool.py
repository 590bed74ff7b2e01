"""The recycling study's pool (:mod:`lorafuse.studies.recycle`): LoRAs of the skill world's tasks,
their subsets and mixtures, composites and irrelevant text, trained once per world and cached.

The recipe (:func:`pool_plan`) is fixed: every trained pool LoRA uses the world's own
LoRA-training helper (:func:`lorafuse.skillworld.build.train_lora`) with the world's pool-LoRA
recipe, at most :data:`POOL_STEPS` steps, at the faithful family's rank, one seed per LoRA;
:func:`build_pool` trains what is missing at the world profile's thread count and indexes the
pool into its catalogue.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorafuse._io import atomic_output_dir
from lorafuse.errors import LorafuseError
from lorafuse.library import index
from lorafuse.skillworld.build import PROFILES, read_manifest, train_lora, world_threads
from lorafuse.skillworld.data import (
    COMPOSITES,
    FAITHFUL_COMPOSITES,
    FAITHFUL_SKILLS,
    POOL,
    SKILLS,
    read_jsonl,
)
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train.loop import TrainConfig


class StudyError(LorafuseError, ValueError):
    """A runs log that cannot be resumed, or a pool that is not built yet."""


KINDS = ("world", "subset", "mixture", "composite", "irrelevant")
POOL_STEPS = 150  # at most, per trained pool LoRA
WORLD_LORAS = [*SKILLS, *FAITHFUL_SKILLS, *POOL]
MIXTURES = [
    ("math", "lang_zorb"),
    ("math", "lang_vell"),
    ("list", "lang_zorb"),
    ("list", "lang_vell"),
    ("math_worded", "chat_zorb"),
    ("math_worded", "chat_vell"),
    ("list_worded", "chat_zorb"),
    ("list_worded", "chat_vell"),
    ("math", "list"),
    ("math_worded", "list_worded"),
    ("chat_zorb", "chat_vell"),
    tuple(POOL),
]


def pool_plan(quick: bool) -> list[dict[str, Any]]:
    """The trained part of the pool: ``{"name", "kind", "tasks", "data", "seed"}`` per LoRA.

    ``data`` says how the training rows are drawn: ``half`` (a seeded half of each task's train
    set), ``all`` (the union), ``oracle`` (a sample of a composite's oracle set), ``shuffled`` /
    ``random`` / ``mismatched`` (irrelevant text).
    """
    plan: list[dict[str, Any]] = []
    skills = [*SKILLS, *FAITHFUL_SKILLS]
    subsets = (
        [(t, i) for t in skills[:4] for i in range(1)]
        if quick
        else [
            *((t, i) for t in skills for i in range(2)),
            *((t, 0) for t in POOL),
        ]
    )
    for task, i in subsets:
        plan.append({"name": f"subset-{task}-{i}", "kind": "subset", "tasks": [task], "data": "half"})
    for mix in MIXTURES[:3] if quick else MIXTURES:
        name = "mix-pool" if mix == tuple(POOL) else "mix-" + "+".join(mix)
        plan.append({"name": name, "kind": "mixture", "tasks": list(mix), "data": "all"})
    composites = ["math_worded_vell", "math_zorb"] if quick else [*FAITHFUL_COMPOSITES, *COMPOSITES]
    for composite in composites:
        plan.append(
            {"name": f"comp-{composite}", "kind": "composite", "tasks": [composite], "data": "oracle"}
        )
    irrelevant = (
        [("shuffled", 0), ("random", 0), ("mismatched", 0)]
        if quick
        else [
            *(("shuffled", i) for i in range(3)),
            *(("random", i) for i in range(3)),
            ("mismatched", 0),
            ("mismatched", 1),
        ]
    )
    for data, i in irrelevant:
        tasks = (
            ["math_worded"] if data == "mismatched" and i == 0 else ["list"] if data == "mismatched" else []
        )
        plan.append(
            {"name": f"irr-{data}-{i}", "kind": "irrelevant", "tasks": [], "source": tasks, "data": data}
        )
    for n, entry in enumerate(plan):
        entry["seed"] = 7_000 + n
    return plan


def _pool_rows(root: Path, entry: dict[str, Any], vocab: list[str], size: int) -> list[dict[str, str]]:
    """The training rows of one planned pool LoRA (deterministic from its seed)."""
    rng = random.Random(entry["seed"])
    data = root / "data"
    kind = entry["data"]
    if kind == "half":
        rows = read_jsonl(data / entry["tasks"][0] / "train.jsonl")
        return rng.sample(rows, len(rows) // 2)
    if kind == "all":
        rows = [r for t in entry["tasks"] for r in read_jsonl(data / t / "train.jsonl")]
        rng.shuffle(rows)
        return rows
    if kind == "oracle":
        rows = read_jsonl(data / entry["tasks"][0] / "oracle_train.jsonl")
        return rng.sample(rows, min(len(rows), size))
    if kind == "mismatched":  # a task's prompts, each with another row's answer
        rows = read_jsonl(data / entry["source"][0] / "train.jsonl")
        answers = [r["completion"] for r in rows]
        rng.shuffle(answers)
        return [{"prompt": r["prompt"], "completion": a} for r, a in zip(rows, answers, strict=True)]
    if kind == "shuffled":  # the base's corpus, words shuffled within each line
        lines = [ln.split() for ln in (data / "pretrain.txt").read_text().splitlines() if len(ln.split()) > 3]
        out = []
        for words in rng.sample(lines, min(len(lines), size)):
            rng.shuffle(words)
            half = len(words) // 2
            out.append({"prompt": " ".join(words[:half]), "completion": " ".join(words[half:])})
        return out
    if kind == "random":  # words drawn uniformly from the vocabulary
        return [
            {
                "prompt": " ".join(rng.choices(vocab, k=rng.randint(4, 12))),
                "completion": " ".join(rng.choices(vocab, k=rng.randint(4, 12))),
            }
            for _ in range(size)
        ]
    raise ValueError(f"unknown pool data {kind!r}")


def pool_dir(root: Path, quick: bool) -> Path:
    return Path(root) / "recycle" / ("quick" if quick else "full")


def _profile(root: Path) -> Any:
    return PROFILES[str((read_manifest(root) or {}).get("profile", "default"))]


def _pool_recipe(root: Path, quick: bool) -> dict[str, Any]:
    manifest = read_manifest(root) or {}
    spec = _profile(root)
    config = replace(spec.pool_lora, steps=min(spec.pool_lora.steps, POOL_STEPS))
    return {
        "format": 1,
        "quick": quick,
        "world_seed": manifest.get("seed"),
        "train": asdict(config),
        "rank": spec.faithful_lora_rank,
        "alpha": spec.faithful_lora_alpha,
        "sample": 1000,
        "plan": pool_plan(quick),
    }


def build_pool(
    root: Path, *, quick: bool = False, progress: bool = True, train: bool = True
) -> dict[str, Any]:
    """Train (or reuse) the pool's LoRAs and index them with the world's into the catalogue
    (without ``train``, a pool that is not complete is a :class:`StudyError`).

    Returns ``{"dir", "catalogue", "loras": [{"name", "kind", "tasks", "path"}], "seconds",
    "train_seconds": {name: s}, "index": {...}}``.
    """
    started = time.perf_counter()
    out = pool_dir(root, quick)
    recipe = json.loads(json.dumps(_pool_recipe(root, quick)))  # as pool.json holds it (lists, not tuples)
    record = out / "pool.json"
    old = json.loads(record.read_text()) if record.is_file() else {}
    seconds: dict[str, float] = dict(old.get("train_seconds", {})) if old.get("recipe") == recipe else {}
    (out / "loras").mkdir(parents=True, exist_ok=True)
    tokenizer, base = None, None
    todo = [
        e
        for e in recipe["plan"]
        if e["name"] not in seconds or not (out / "loras" / e["name"] / "adapter_model.safetensors").is_file()
    ]
    if todo and not train:
        raise StudyError(f"{out}: the pool is not built yet ({len(todo)} LoRAs missing); run the study first")
    if todo:
        tokenizer, base = load_world(root)
        base.train()
        vocab = [w for w in tokenizer.get_vocab() if not (w.startswith("<") and w.endswith(">"))]
        vocab.sort()
        config = TrainConfig(**recipe["train"])
        bar = tqdm(todo, desc="recycle pool", unit="lora", disable=not progress)
        # the pool belongs to the world: its bits follow the world's thread count, not the study's
        with world_threads(_profile(root)):
            for entry in bar:
                t0 = time.perf_counter()
                rows = _pool_rows(root, entry, vocab, recipe["sample"])
                with atomic_output_dir(out / "loras" / entry["name"]) as tmp:
                    train_lora(
                        base,
                        tokenizer,
                        rows,
                        replace(config, seed=entry["seed"]),
                        _profile(root),
                        tmp,
                        desc=f"pool {entry['name']}",
                        rank=recipe["rank"],
                        alpha=recipe["alpha"],
                    )
                seconds[entry["name"]] = round(time.perf_counter() - t0, 2)
                record.write_text(json.dumps({"recipe": recipe, "train_seconds": seconds}, indent=2) + "\n")
        bar.close()
    record.write_text(json.dumps({"recipe": recipe, "train_seconds": seconds}, indent=2) + "\n")
    if base is None:
        _, base = load_world(root)
    t0 = time.perf_counter()
    catalogue = out / "catalogue.sqlite"
    world_folders = [root / "loras" / name for name in WORLD_LORAS]
    report = index(catalogue, [out / "loras", *world_folders], base=base, progress=False)
    loras = [
        {"name": name, "kind": "world", "tasks": [name], "path": str(root / "loras" / name)}
        for name in WORLD_LORAS
    ] + [
        {"name": e["name"], "kind": e["kind"], "tasks": e["tasks"], "path": str(out / "loras" / e["name"])}
        for e in recipe["plan"]
    ]
    return {
        "dir": str(out),
        "catalogue": str(catalogue),
        "loras": loras,
        "kinds": {kind: sum(1 for lo in loras if lo["kind"] == kind) for kind in KINDS},
        "train_seconds": seconds,
        "index": {**asdict(report), "seconds": round(time.perf_counter() - t0, 2)},
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- the study -------------------------------------------------------------------------------------
