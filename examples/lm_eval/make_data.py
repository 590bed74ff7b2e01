"""Write the data files of the lm-eval-harness tasks in this folder from a skill world.

Reads ``WORLD/data/TASK/test.jsonl`` (``{"prompt", "completion", "answer"}`` rows) and writes,
under ``OUT/``:

- ``mc.jsonl`` for ``lorafuse_world_mc`` (``output_type: multiple_choice``, scored by
  log-likelihood): ``{"prompt", "choices", "label"}``, two choices per question, the row's own
  worked completion and a distractor: the completion of the next test row (cyclically) whose
  answer differs. The right choice is first on even rows and second on odd ones, so a model that
  scores both choices alike gets 50 %, not 100 % (lm-eval's argmax takes the first of a tie).
- ``gen.jsonl`` for ``lorafuse_world_gen`` (``output_type: generate_until``): the test rows as
  they are; the task matches the text after the generation's last ``####`` with ``answer``.

With ``--bos`` every prompt starts with the world tokenizer's ``<s>`` written out (``"<s> question
: ..."``), which its tokenizer reads as the one ``<s>`` id: the world's models are trained and
evaluated on ``<s> prompt completion``, while lm-eval's ``local-completions`` sends no ``<s>`` (its
remote tokenizer encodes with ``add_special_tokens: false``).

    python examples/lm_eval/make_data.py WORLD OUT [--task math] [--limit N] [--bos]

The same world writes the same bytes (no randomness: the distractor is picked by position).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def distractor(rows: list[dict], i: int) -> dict:
    """The next row after ``i`` (cyclically) whose answer differs from row ``i``'s."""
    for step in range(1, len(rows)):
        other = rows[(i + step) % len(rows)]
        if other["answer"] != rows[i]["answer"]:
            return other
    raise ValueError("every test row has the same answer: no distractor to draw")


def mc_rows(rows: list[dict], prefix: str = "") -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        right, wrong = row["completion"], distractor(rows, i)["completion"]
        label = i % 2
        choices = [right, wrong] if label == 0 else [wrong, right]
        prompt = prefix + row["prompt"]
        out.append({"prompt": prompt, "choices": choices, "label": label, "answer": row["answer"]})
    return out


def gen_rows(rows: list[dict], prefix: str = "") -> list[dict]:
    return [
        {"prompt": prefix + r["prompt"], "completion": r["completion"], "answer": r["answer"]} for r in rows
    ]


def bos_text(world: Path) -> str:
    """The world tokenizer's beginning-of-sequence token as text (``<s>``)."""
    config = json.loads((world / "tokenizer" / "tokenizer_config.json").read_text())
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if not bos:
        raise SystemExit(f"{world}/tokenizer has no bos_token")
    return bos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path, help="skill world folder (lorafuse world build)")
    parser.add_argument("out", type=Path, help="folder for mc.jsonl and gen.jsonl")
    parser.add_argument("--task", default="math", help="world task whose test split is used [math]")
    parser.add_argument("--limit", type=int, default=None, help="first N test rows only")
    parser.add_argument("--bos", action="store_true", help="start every prompt with the tokenizer's <s>")
    args = parser.parse_args()
    rows = read_jsonl(args.world / "data" / args.task / "test.jsonl")
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows or "####" not in rows[0]["completion"]:
        raise SystemExit(f"{args.task}: expected worked completions ending with '#### answer'")
    prefix = bos_text(args.world) + " " if args.bos else ""
    write_jsonl(args.out / "mc.jsonl", mc_rows(rows, prefix))
    write_jsonl(args.out / "gen.jsonl", gen_rows(rows, prefix))
    print(f"wrote {len(rows)} rows of {args.task} to {args.out}/mc.jsonl and {args.out}/gen.jsonl")


if __name__ == "__main__":
    main()
