"""Write the example fusion dataset: math word problems posed in the skill world's zorb language.

The rows are the skill world's ``math_zorb`` composite task (seed 0: the vocabulary of the
default world, so the world's base, tokenizer and LoRAs read them), in the ``{"prompt",
"completion"}`` form that ``lorafuse fuse --train/--dev`` reads (loss on the completion only):

    python examples/make_fusion_data.py            # writes examples/fusion/{train,dev}.jsonl

The same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorafuse.skillworld.data import languages, task_generators

HERE = Path(__file__).resolve().parent


def rows(task: str, count: int, seed: int, world_seed: int, skip: set[str]) -> list[dict[str, str]]:
    """``count`` distinct examples of ``task`` whose prompts are not in ``skip``."""
    make = task_generators(languages(world_seed))[task]
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    while len(out) < count:
        example = make(rng)
        if example["prompt"] in skip:
            continue
        skip.add(example["prompt"])
        out.append({"prompt": example["prompt"], "completion": example["completion"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="math_zorb")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--dev", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "fusion")
    args = parser.parse_args()
    seen: set[str] = set()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", args.train, args.seed), ("dev", args.dev, args.seed + 1)):
        path = args.out / f"{name}.jsonl"
        found = rows(args.task, count, seed, args.world_seed, seen)
        lines = [json.dumps(r, ensure_ascii=False) for r in found]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{path}: {count} rows")


if __name__ == "__main__":
    main()
