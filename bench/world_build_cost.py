"""What building the skill world costs on this machine, part by part, from a few timed steps.

Each part of the faithful study's world (pretraining the base, the four faithful skill LoRAs, the
four faithful oracles) is trained for ``--steps`` optimizer steps with the build's own recipe
(``lorafuse.skillworld.build``: the same data, batch, rank and training loop), ``--reps`` times;
its predicted cost is the recipe's step count × the median seconds per step. Where the world's
manifest records what the build itself took, that is printed beside the prediction.

    python bench/world_build_cost.py [--dir WORLD] [--steps 25] [--reps 2] [--lora-batch 16]

Needs the world's core (``lorafuse world build`` builds it; the LoRAs are not needed). Writes
``bench/results/world_build_cost[-b<batch>].{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lorafuse._data import encode_examples, encode_text
from lorafuse._io import versions
from lorafuse.skillworld.build import (
    PROFILES,
    _lora_recipe,
    default_world_dir,
    fresh_peft_lora,
    read_manifest,
    variant_loras,
)
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train.loop import TrainConfig, train_loop


def _seconds_per_step(run: Callable[[int], None], steps: int, reps: int) -> list[float]:
    """Wall seconds per step of ``run(steps)``, each rep (the setup of each run included)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="world folder [default world]")
    parser.add_argument("--steps", type=int, default=25, help="timed optimizer steps per part and rep")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--lora-batch", type=int, default=None, help="batch of every LoRA [the recipe's]")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    spec = PROFILES["default"]
    root = args.dir or default_world_dir("default", 0)
    torch.set_num_threads(spec.threads)
    tokenizer, base = load_world(root)
    pad = tokenizer.pad_token_id
    manifest = read_manifest(root) or {}
    parts: dict[str, dict[str, object]] = {}

    texts = (root / "data" / "pretrain.txt").read_text().splitlines()
    pretrain_data = encode_text(tokenizer, texts)

    def pretrain(steps: int) -> None:
        model = copy.deepcopy(base)
        config = replace(spec.pretrain, steps=steps)
        train_loop(model, model.parameters(), pretrain_data, config, pad_id=pad, progress=False)

    per_step = _seconds_per_step(pretrain, args.steps, args.reps)
    parts["pretrain base"] = {
        "steps": spec.pretrain.steps,
        "batch_size": spec.pretrain.batch_size,
        "seconds_per_step": [round(t, 4) for t in per_step],
        "predicted_s": round(spec.pretrain.steps * statistics.median(per_step), 1),
        "recorded_s": manifest.get("build_seconds"),  # the whole core: data, tokenizer, pretraining
    }
    print(f"pretrain base: {parts['pretrain base']}", flush=True)

    for name in variant_loras("faithful"):
        data, config, rank, alpha = _lora_recipe(spec, name, 0)
        if args.lora_batch:
            config = replace(config, batch_size=args.lora_batch)
        rows = encode_examples(tokenizer, read_jsonl(root / "data" / data))

        def train(
            steps: int, config: TrainConfig = config, rows: list = rows, rank: int = rank, alpha: int = alpha
        ) -> None:
            model = fresh_peft_lora(base, rank, alpha)
            train_loop(
                model, model.parameters(), rows, replace(config, steps=steps), pad_id=pad, progress=False
            )

        per_step = _seconds_per_step(train, args.steps, args.reps)
        parts[name] = {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "rank": rank,
            "seconds_per_step": [round(t, 4) for t in per_step],
            "predicted_s": round(config.steps * statistics.median(per_step), 1),
            "recorded_s": manifest.get("loras", {}).get(name, {}).get("seconds"),
        }
        print(f"{name}: {parts[name]}", flush=True)

    total = round(sum(float(p["predicted_s"]) for p in parts.values()), 1)  # type: ignore[arg-type]
    result = {
        "world": str(root),
        "timed_steps": args.steps,
        "reps": args.reps,
        "lora_batch": args.lora_batch,
        "threads": spec.threads,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "versions": versions(),
        "parts": parts,
        "predicted_total_s": total,
        "pretrain_recipe": asdict(spec.pretrain),
    }
    suffix = f"-b{args.lora_batch}" if args.lora_batch else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"world_build_cost{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| part | steps | batch | s/step (each rep) | predicted s | recorded s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, p in parts.items():
        reps = ", ".join(f"{t:.3f}" for t in p["seconds_per_step"])  # type: ignore[attr-defined]
        recorded = p["recorded_s"] or "—"
        lines.append(
            f"| {name} | {p['steps']} | {p['batch_size']} | {reps} | {p['predicted_s']} | {recorded} |"
        )
    lines.append(f"| **total** | | | | **{total}** | |")
    table = "\n".join(lines)
    (args.out / f"world_build_cost{suffix}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
