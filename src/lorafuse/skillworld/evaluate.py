"""The skill world's accuracy matrix: rows = base, each skill and pool LoRA, each oracle; columns = tasks.

All LoRAs are attached once as one bank; each row is a one-hot weighting of it (the base is all
zeros), so the matrix costs one model load. Exact match (%) on each task's test set; an oracle
is scored on its own composite only. :func:`world_conditions` checks what makes the world a test
of composition, per variant: each single LoRA strong on its own skill (≥ 80 %), the base near 0
(≤ 5 %), every single LoRA low on the composites (≤ 20 %), each oracle ≥ 30 points above every
single LoRA on its composite.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse._hf import load_model, load_tokenizer
from lorafuse.adapters import load_lora
from lorafuse.eval import evaluate
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.build import MANIFEST, read_manifest
from lorafuse.skillworld.data import (
    ALL_COMPOSITES,
    ALL_SKILLS,
    POOL,
    VARIANTS,
    composite_loras,
    read_jsonl,
)


def load_world(root: Path) -> tuple[Any, Any]:
    """The world's tokenizer and base model, through the plain HuggingFace APIs."""
    return load_tokenizer(root / "tokenizer"), load_model(root / "base")


def accuracy_matrix(
    root: Path,
    *,
    limit: int | None = None,
    progress: bool = True,
    skills: list[str] | None = None,
    composites: list[str] | None = None,
    pool: bool = True,
) -> dict[str, Any]:
    """Exact match of the base, the skill and pool LoRAs and the oracles on every task's test split.

    ``skills`` / ``composites`` narrow the matrix (default: every one of the world); an oracle
    row is scored on its composite alone. Rows whose tasks carry a ``final_answer`` also get
    MGSM's metric (the result alone) in ``final_answer``.
    """
    started = time.perf_counter()
    skills = list(ALL_SKILLS if skills is None else skills)
    composites = list(ALL_COMPOSITES if composites is None else composites)
    pool_tasks = POOL if pool else []
    tokenizer, model = load_world(root)
    rows = ["base", *skills, *pool_tasks, *(f"oracle_{c}" for c in composites)]
    loras = {name: load_lora(root / "loras" / name) for name in rows[1:]}
    bank = attach(model, loras)
    columns = [*skills, *composites, *pool_tasks]
    tests = {t: read_jsonl(root / "data" / t / "test.jsonl")[:limit] for t in columns}
    cells = [(r, c) for r in rows for c in columns if not r.startswith("oracle_") or r == f"oracle_{c}"]
    matrix: dict[str, dict[str, float | None]] = {r: dict.fromkeys(columns) for r in rows}
    final: dict[str, dict[str, float | None]] = {}
    bar = tqdm(total=len(cells), desc="world eval", unit="cell", disable=not progress)
    for row in rows:
        weights = torch.zeros(len(loras))
        if row != "base":
            weights[list(loras).index(row)] = 1.0
        bank.set_weights(weights)
        for task in [c for r, c in cells if r == row]:
            scores = evaluate(model, tokenizer, tests[task])
            matrix[row][task] = round(scores["exact_match"], 1)
            if "final_answer_match" in scores:
                final.setdefault(row, {})[task] = round(scores["final_answer_match"], 1)
            bar.update()
    bar.close()
    detach(model)
    return {
        "metric": "exact match (%) on the test split",
        "limit": limit,
        "rows": rows,
        "columns": columns,
        "matrix": matrix,
        "final_answer": final,
        "conditions": world_conditions(matrix, composites),
        "seconds": round(time.perf_counter() - started, 1),
    }


SKILL_MIN, BASE_MAX, SINGLE_MAX, ORACLE_MARGIN = 80.0, 5.0, 20.0, 30.0


def world_conditions(
    matrix: dict[str, dict[str, float | None]], composites: list[str]
) -> list[dict[str, Any]]:
    """Each condition of the world, per variant: ``{variant, condition, value, ok}``."""
    out: list[dict[str, Any]] = []

    def check(variant: str, condition: str, value: float | None, ok: bool) -> None:
        out.append({"variant": variant, "condition": condition, "value": value, "ok": bool(ok)})

    for variant, members in VARIANTS.items():
        chosen = [c for c in members if c in composites]
        singles = sorted({lora for c in chosen for lora in composite_loras(c)})
        if not chosen or any(s not in matrix for s in singles):
            continue
        for lora in singles:
            value = matrix[lora][lora]
            check(variant, f"{lora} on its own skill ≥ {SKILL_MIN:g}", value, (value or 0) >= SKILL_MIN)
        base = max(v for t in [*singles, *chosen] if (v := matrix["base"][t]) is not None)
        check(variant, f"base on the variant's tasks ≤ {BASE_MAX:g} (max)", base, base <= BASE_MAX)
        for c in chosen:
            single = max(matrix[lora][c] or 0.0 for lora in singles)
            check(variant, f"every single LoRA on {c} ≤ {SINGLE_MAX:g} (max)", single, single <= SINGLE_MAX)
            oracle = matrix.get(f"oracle_{c}", {}).get(c)
            if oracle is not None:
                margin = oracle - single
                check(
                    variant,
                    f"oracle_{c} ≥ {ORACLE_MARGIN:g} points above every single LoRA",
                    margin,
                    margin >= ORACLE_MARGIN,
                )
    return out


def record_eval(root: Path, result: dict[str, Any]) -> None:
    """Write the matrix into the world's manifest (atomically)."""
    manifest = read_manifest(root) or {}
    manifest["eval"] = result
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / MANIFEST)


def format_matrix(result: dict[str, Any]) -> str:
    """A Markdown table of the matrix (``—``: not scored), then the world's conditions."""
    columns = result["columns"]
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in result["rows"]:
        values = [result["matrix"][row][c] for c in columns]
        lines.append(f"| {row} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in values) + " |")
    conditions = result.get("conditions") or []
    if conditions:
        lines += ["", "| variant | condition | value | holds |", "| --- | --- | ---: | --- |"]
        for c in conditions:
            value = "—" if c["value"] is None else f"{c['value']:.1f}"
            lines.append(f"| {c['variant']} | {c['condition']} | {value} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)
