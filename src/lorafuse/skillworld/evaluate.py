"""The skill world's accuracy matrix: rows = base, each skill and pool LoRA, each oracle; columns = tasks.

All LoRAs are attached once as one bank; each row is a one-hot weighting of it (the base is all
zeros), so the matrix costs one model load. Exact match (%) on each task's test set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.adapters import load_lora
from lorafuse.eval import evaluate
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.build import MANIFEST, read_manifest
from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS, read_jsonl


def load_world(root: Path) -> tuple[Any, Any]:
    """The world's tokenizer and base model, through the plain HuggingFace APIs."""
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    return tokenizer, model


def accuracy_matrix(root: Path, *, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Exact match of the base, the skill and pool LoRAs and the oracles on every task's test split."""
    started = time.perf_counter()
    tokenizer, model = load_world(root)
    rows = ["base", *SKILLS, *POOL, *(f"oracle_{c}" for c in COMPOSITES)]
    loras = {name: load_lora(root / "loras" / name) for name in rows[1:]}
    bank = attach(model, loras)
    columns = [*SKILLS, *COMPOSITES, *POOL]
    tests = {t: read_jsonl(root / "data" / t / "test.jsonl")[:limit] for t in columns}
    matrix: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(rows) * len(columns), desc="world eval", unit="cell", disable=not progress)
    for row in rows:
        weights = torch.zeros(len(loras))
        if row != "base":
            weights[list(loras).index(row)] = 1.0
        bank.set_weights(weights)
        matrix[row] = {}
        for task in columns:
            matrix[row][task] = round(evaluate(model, tokenizer, tests[task])["exact_match"], 1)
            bar.update()
    bar.close()
    detach(model)
    return {
        "metric": "exact match (%) on the test split",
        "limit": limit,
        "rows": rows,
        "columns": columns,
        "matrix": matrix,
        "seconds": round(time.perf_counter() - started, 1),
    }


def record_eval(root: Path, result: dict[str, Any]) -> None:
    """Write the matrix into the world's manifest (atomically)."""
    manifest = read_manifest(root) or {}
    manifest["eval"] = result
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / MANIFEST)


def format_matrix(result: dict[str, Any]) -> str:
    """A Markdown table of the matrix."""
    columns = result["columns"]
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row} | " + " | ".join(f"{result['matrix'][row][c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)
