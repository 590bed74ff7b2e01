"""The skill world: deterministic data, artefacts loadable by plain HF/PEFT APIs, eval metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse import load_lora
from lorafuse.eval import exact_match, extract_answer
from lorafuse.skillworld import COMPOSITES, POOL, SKILLS, build_world, is_complete
from lorafuse.skillworld.build import read_manifest
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import accuracy_matrix
from lorafuse.skillworld.language import Language


def test_two_builds_give_identical_data(tiny_world: Path, tmp_path: Path) -> None:
    again = build_world(tmp_path / "again", profile="tiny", seed=0, progress=False)
    first, second = read_manifest(tiny_world)["files"], read_manifest(again)["files"]
    data = {k for k in first if k.startswith("data/") or k.startswith("tokenizer/")}
    assert data and {k: first[k] for k in data} == {k: second[k] for k in data}
    other = build_world(tmp_path / "other", profile="tiny", seed=1, progress=False)
    assert read_manifest(other)["files"]["data/math/train.jsonl"] != first["data/math/train.jsonl"]


def test_complete_build_is_reused_and_damage_rebuilt(tiny_world: Path, tmp_path: Path) -> None:
    assert is_complete(tiny_world, "tiny", 0)
    stamp = (tiny_world / "manifest.json").stat().st_mtime_ns
    build_world(tiny_world, profile="tiny", seed=0, progress=False)
    assert (tiny_world / "manifest.json").stat().st_mtime_ns == stamp
    copy = build_world(tmp_path / "w", profile="tiny", seed=0, progress=False)
    (copy / "data" / "math" / "test.jsonl").write_text("damaged\n")
    assert not is_complete(copy, "tiny", 0)
    build_world(copy, profile="tiny", seed=0, progress=False)
    assert is_complete(copy, "tiny", 0)


def test_task_files_and_sizes(tiny_world: Path) -> None:
    for task in [*SKILLS, *COMPOSITES, *POOL]:
        for split in ("train", "dev", "test"):
            rows = read_jsonl(tiny_world / "data" / task / f"{split}.jsonl")
            assert rows and set(rows[0]) == {"prompt", "completion", "answer"}
    assert len(read_jsonl(tiny_world / "data" / "math_zorb" / "train.jsonl")) == 200
    train = {r["prompt"] for r in read_jsonl(tiny_world / "data" / "math_zorb" / "train.jsonl")}
    test = {r["prompt"] for r in read_jsonl(tiny_world / "data" / "math_zorb" / "test.jsonl")}
    assert not train & test


def test_artefacts_load_with_plain_hf_and_peft(tiny_world: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "base")
    assert model.config.vocab_size == len(tokenizer)
    row = read_jsonl(tiny_world / "data" / "math" / "test.jsonl")[0]
    ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
    assert tokenizer.unk_token_id not in ids[0].tolist()
    assert tokenizer.decode(ids[0]) == row["prompt"]
    manifest = read_manifest(tiny_world)
    for name in manifest["loras"]:
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_world / "base"), tiny_world / "loras" / name
        )
        with torch.no_grad():
            assert torch.isfinite(peft_model(ids).logits).all()
        assert len(load_lora(tiny_world / "loras" / name)) == 7 * 2


def test_language_word_orders() -> None:
    lang = Language("x", {"ana": "ko", "has": "pa", "apples": "ti"}, {3: "mu"}, "reverse")
    assert lang.translate("ana has 3 apples .") == "ti mu pa ko ."
    rotate = Language("y", lang.lexicon, lang.numbers, "rotate")
    assert rotate.translate("ana has 3 apples .") == "pa mu ti ko ."


@pytest.mark.parametrize(
    ("generated", "answer", "completion", "hit"),
    [
        ("3 + 4 = 7 . #### 7", "7", "3 + 4 = 7 . #### 7", True),
        ("3 + 4 = 8 . #### 7", "7", "3 + 4 = 7 . #### 7", True),  # the answer counts, not the steps
        ("3 + 4 = 7 . #### 1 7", "7", "3 + 4 = 7 . #### 7", False),
        ("3 + 4 = 7 .", "7", "3 + 4 = 7 . #### 7", False),  # no marker, no answer
        ("#### 1 ####  2", "2", "#### 2", True),  # the last marker
        ("the list is 1 2 .", "the list is 1 2 .", "the list is 1 2 .", True),
        ("the list is 1 2", "the list is 1 2 .", "the list is 1 2 .", False),
    ],
)
def test_exact_match_cases(generated: str, answer: str, completion: str, hit: bool) -> None:
    assert exact_match(generated, answer, completion) is hit
    assert extract_answer("a #### b", "#### b") == "b"


def test_accuracy_matrix_shape(tiny_world: Path) -> None:
    result = accuracy_matrix(tiny_world, limit=4, progress=False)
    assert result["rows"][0] == "base" and len(result["rows"]) == 1 + len(SKILLS) + len(POOL) + len(
        COMPOSITES
    )
    assert all(0.0 <= v <= 100.0 for row in result["matrix"].values() for v in row.values())
    assert json.dumps(result)


def test_merge_study_runs_every_method(tiny_world: Path) -> None:
    from lorafuse.skillworld.merge_study import METHODS, format_study, merge_study

    result = merge_study(tiny_world, limit=2, progress=False)
    assert set(result["results"]) == {*COMPOSITES, "pool"}
    assert set(result["results"]["math_zorb"]) == set(METHODS)
    assert set(result["results"]["math_zorb"]["ties"]) == {"math_zorb", "math", "lang_zorb"}
    assert "| lego |" in format_study(result)
