"""LoRA-Flow's ablations on every composite task of the skill world.

Variants (:data:`FLOW_VARIANTS`): the paper's gate per layer, one gate per module, one gate for
all layers (step), the bias inside the softmax, and a 10× learning rate; exact match on the test
split and the best dev loss of each run. Each run is one call of :func:`lorafuse.fuse` (the bank
kept attached to score the test split, then detached).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorafuse.adapters import load_lora
from lorafuse.fusion import FuseSettings, fuse
from lorafuse.fusion.api import FLOW_TRAIN
from lorafuse.runtime import detach
from lorafuse.skillworld.data import COMPOSITES, composite_loras, read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.studies.composition import score

FLOW_VARIANTS: dict[str, dict[str, Any]] = {
    "layer gates (paper), lr 1e-3": {},
    "layer gates, lr 1e-2": {"lr": 1e-2},
    "module gates, lr 1e-3": {"granularity": "module"},
    "step gate, lr 1e-3": {"granularity": "step"},
    "bias inside softmax, lr 1e-3": {"bias_in_softmax": True},
}


def flow_ablation(
    root: Path,
    *,
    seeds: Sequence[int] = (0,),
    limit: int | None = 100,
    composites: Sequence[str] = COMPOSITES,
    variants: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LoRA-Flow's ablations (gate granularity, bias placement) and a 10× learning rate, per composite.

    Exact match (%) on the first ``limit`` test examples, and the best dev loss of each run.
    """
    started = time.perf_counter()
    variants = variants or FLOW_VARIANTS
    tokenizer, model = load_world(root)
    scores: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    dev_losses: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    bar = tqdm(total=len(composites) * len(variants) * len(seeds), desc="flow ablation", disable=not progress)
    for composite in composites:
        lang_name, task_name = composite_loras(composite)
        data = root / "data" / composite
        train_rows, dev_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "dev.jsonl")
        test_rows = read_jsonl(data / "test.jsonl")[:limit]
        loras = {"lang": load_lora(root / "loras" / lang_name), "task": load_lora(root / "loras" / task_name)}
        for name, options in variants.items():
            options = dict(options)
            train = replace(FLOW_TRAIN, lr=options.pop("lr", FLOW_TRAIN.lr))
            for seed in seeds:
                settings = FuseSettings(method="lora-flow", train=train, seed=seed, **options)
                fusion = fuse(
                    model,
                    tokenizer,
                    loras,
                    train_rows,
                    dev_rows,
                    settings,
                    keep_attached=True,
                    progress=False,
                )
                scores[name].setdefault(composite, []).append(score(model, tokenizer, test_rows))
                dev_losses[name].setdefault(composite, []).append(
                    round(fusion.info["result"]["best_dev_loss"], 4)
                )
                detach(model)
                bar.update()
    bar.close()
    return {
        "metric": "exact match (%) on the test split",
        "limit": limit,
        "seeds": list(seeds),
        "composites": list(composites),
        "variants": {k: dict(v) for k, v in variants.items()},
        "scores": scores,
        "best_dev_loss": dev_losses,
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_ablation(result: dict[str, Any]) -> str:
    """Markdown: variants × composites, ``exact match / best dev loss`` (means over seeds)."""
    composites = result["composites"]
    lines = [
        "| LoRA-Flow variant | " + " | ".join(f"{c} (EM / dev loss)" for c in composites) + " | avg EM |",
        "| --- | " + " | ".join("---:" for _ in composites) + " | ---: |",
    ]
    for name in result["variants"]:
        ems = [statistics.mean(result["scores"][name][c]) for c in composites]
        devs = [statistics.mean(result["best_dev_loss"][name][c]) for c in composites]
        cells = [f"{e:.1f} / {d:.3f}" for e, d in zip(ems, devs, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(ems):.1f} |")
    return "\n".join(lines)
