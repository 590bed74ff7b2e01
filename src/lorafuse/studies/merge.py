"""Merging on the skill world: each merge method on (language LoRA, task LoRA) pairs and the pool.

For every composite task ``<skill>_<language>``, the ``lang_<language>`` and ``<skill>`` LoRAs are
merged (weights 1, 1: task arithmetic) by each method and the merged adapter is scored on every
task; the whole set of skill and pool LoRAs is merged the same way. Single LoRAs are reported
beside them (from the accuracy matrix rows).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorafuse.adapters import load_lora
from lorafuse.eval import evaluate
from lorafuse.merging import merge
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS, composite_loras, read_jsonl
from lorafuse.skillworld.evaluate import load_world

METHODS: dict[str, dict[str, Any]] = {
    "cat": {},
    "svd": {"rank": 16},
    "ties": {"rank": 16, "density": 0.5},
    "dare-linear": {"rank": 16, "density": 0.5},
    "dare-ties": {"rank": 16, "density": 0.5},
    "magnitude-prune": {"rank": 16, "density": 0.5},
    "lego": {"rank": 16},
}


def merge_study(
    root: Path, *, limit: int | None = 100, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer, model = load_world(root)
    columns = [*SKILLS, *COMPOSITES, *POOL]
    tests = {t: read_jsonl(root / "data" / t / "test.jsonl")[:limit] for t in columns}
    groups = {c: list(composite_loras(c)) for c in COMPOSITES}
    groups["pool"] = [*SKILLS, *POOL]
    loras = {name: load_lora(root / "loras" / name) for name in {n for g in groups.values() for n in g}}
    results: dict[str, dict[str, dict[str, float]]] = {}
    bar = tqdm(total=len(groups) * len(METHODS), desc="merge study", unit="merge", disable=not progress)
    for group, names in groups.items():
        results[group] = {}
        for method, settings in METHODS.items():
            settings = dict(settings)
            rank = settings.pop("rank", None)
            merged = merge(
                [loras[n] for n in names], method, None, rank, seed=seed, progress=False, **settings
            )
            attach(model, [merged])
            scored = tasks_for(group, columns)
            results[group][method] = {
                t: round(evaluate(model, tokenizer, tests[t])["exact_match"], 1) for t in scored
            }
            detach(model)
            bar.update()
    bar.close()
    return {
        "metric": "exact match (%) on the test split",
        "limit": limit,
        "weights": "1 per LoRA (task arithmetic)",
        "methods": METHODS,
        "groups": groups,
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def tasks_for(group: str, columns: list[str]) -> list[str]:
    """Pairs are scored on their composite and their two skills; the pool merge on every task."""
    if group == "pool":
        return columns
    skill, language = group.split("_")
    return [group, skill, f"lang_{language}"]


def format_study(result: dict[str, Any], matrix: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown: one table for the pairs (composite / task skill / language skill), one for the pool."""
    pairs = [g for g in result["groups"] if g != "pool"]
    head = " | ".join(f"{g} (comp / task / lang)" for g in pairs)
    lines = [f"| method | {head} |", "| --- | " + " | ".join("---:" for _ in pairs) + " |"]
    if matrix:
        for single in ("task LoRA", "language LoRA"):
            cells = []
            for g in pairs:
                skill, language = g.split("_")
                row = matrix[skill] if single == "task LoRA" else matrix[f"lang_{language}"]
                cells.append(f"{row[g]:.0f} / {row[skill]:.0f} / {row[f'lang_{language}']:.0f}")
            lines.append(f"| {single} alone | " + " | ".join(cells) + " |")
    for method in result["methods"]:
        cells = []
        for g in pairs:
            skill, language = g.split("_")
            r = result["results"][g][method]
            cells.append(f"{r[g]:.0f} / {r[skill]:.0f} / {r[f'lang_{language}']:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    pool = result["results"]["pool"]
    columns = list(next(iter(pool.values())))
    lines += [
        "",
        "| pool merge (10 LoRAs) | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for method, row in pool.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[c]:.0f}" for c in columns) + " |")
    return "\n".join(lines)
