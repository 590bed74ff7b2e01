"""examples/lm_eval: the data its script writes from a world and the task YAMLs that read it
(lm-eval itself is not a dependency; run.sh is run by hand, docs/serving.md has its numbers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from lorafuse.eval.metrics import extract_answer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lm_eval"


def _world(tmp_path: Path) -> Path:
    world = tmp_path / "world"
    (world / "data" / "math").mkdir(parents=True)
    (world / "tokenizer").mkdir()
    (world / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    rows = [
        {"prompt": f"question : q{i} answer :", "completion": f"{i} + 0 = {i} . #### {a}", "answer": a}
        for i, a in enumerate(["1", "1", "2", "1 2", "1"])
    ]
    (world / "data" / "math" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return world


def _make(world: Path, out: Path, *flags: str) -> tuple[list[dict], list[dict]]:
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), str(world), str(out), *flags], check=True)
    read = [
        [json.loads(line) for line in (out / f).read_text().splitlines()] for f in ("mc.jsonl", "gen.jsonl")
    ]
    return read[0], read[1]


def test_make_data_draws_a_distractor_with_another_answer(tmp_path: Path) -> None:
    world = _world(tmp_path)
    rows = [json.loads(line) for line in (world / "data" / "math" / "test.jsonl").read_text().splitlines()]
    mc, gen = _make(world, tmp_path / "a")
    assert [r["label"] for r in mc] == [0, 1, 0, 1, 0]
    for row, item in zip(rows, mc, strict=True):
        right, wrong = item["choices"][item["label"]], item["choices"][1 - item["label"]]
        assert right == row["completion"] and item["prompt"] == row["prompt"]
        other = next(r for r in rows if r["completion"] == wrong)
        assert other["answer"] != row["answer"]
    assert mc[0]["choices"][1] == rows[2]["completion"]  # the next row with another answer
    assert mc[4]["choices"][1] == rows[2]["completion"]  # cyclically
    assert gen == [{k: r[k] for k in ("prompt", "completion", "answer")} for r in rows]
    again = tmp_path / "b"
    _make(world, again)
    assert (again / "mc.jsonl").read_bytes() == (tmp_path / "a" / "mc.jsonl").read_bytes()
    bos_mc, bos_gen = _make(world, tmp_path / "c", "--bos", "--limit", "3")
    assert len(bos_mc) == 3 and bos_gen[0]["prompt"] == "<s> " + rows[0]["prompt"]
    assert bos_mc[1]["prompt"] == "<s> " + rows[1]["prompt"]


def test_task_yamls_read_the_written_files() -> None:
    mc = yaml.safe_load((EXAMPLE / "tasks" / "lorafuse_world_mc.yaml").read_text())
    gen = yaml.safe_load((EXAMPLE / "tasks" / "lorafuse_world_gen.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and gen["output_type"] == "generate_until"
    assert mc["dataset_kwargs"]["data_files"]["test"] == "data/mc.jsonl"
    assert gen["dataset_kwargs"]["data_files"]["test"] == "data/gen.jsonl"
    assert (mc["doc_to_choice"], mc["doc_to_target"]) == ("choices", "label")
    assert gen["generation_kwargs"]["until"] == ["</s>"] and gen["generation_kwargs"]["temperature"] == 0


def test_generation_filter_is_the_worlds_answer_extraction() -> None:
    """The generate_until task's regex filter keeps what lorafuse.eval.metrics would compare."""
    gen = yaml.safe_load((EXAMPLE / "tasks" / "lorafuse_world_gen.yaml").read_text())
    (regex,) = [f for f in gen["filter_list"][0]["filter"] if f["function"] == "regex"]
    pattern = re.compile(regex["regex_pattern"])
    reference = "3 + 4 = 7 . #### 7"
    for text in ["3 + 4 = 7 . #### 7", "#### 1 #### 1 2", "1 2 . #### 1 2 ", "no marker", "#### "]:
        found = pattern.findall(text)
        kept = found[0].strip() if found else ""  # lm-eval's fallback ("[invalid]") matches nothing
        assert kept == extract_answer(text, reference, "7"), text
