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
from lorafuse.skillworld import COMPOSITES, POOL, build_world, is_complete
from lorafuse.skillworld.build import read_manifest
from lorafuse.skillworld.data import (
    ALL_COMPOSITES,
    ALL_SKILLS,
    FAITHFUL_COMPOSITES,
    languages,
    read_jsonl,
    task_generators,
)
from lorafuse.skillworld.evaluate import accuracy_matrix, world_conditions
from lorafuse.skillworld.language import Language


def test_two_builds_give_identical_data(tiny_world: Path, tmp_path: Path) -> None:
    again = build_world(tmp_path / "again", profile="tiny", seed=0, progress=False, loras=[])
    first, second = read_manifest(tiny_world)["files"], read_manifest(again)["files"]
    data = {k for k in first if k.startswith("data/") or k.startswith("tokenizer/")}
    assert data and {k: first[k] for k in data} == {k: second[k] for k in data}
    other = build_world(tmp_path / "other", profile="tiny", seed=1, progress=False, loras=[])
    assert read_manifest(other)["files"]["data/math/train.jsonl"] != first["data/math/train.jsonl"]


def test_complete_build_is_reused_and_damage_rebuilt(tiny_world: Path, tmp_path: Path) -> None:
    assert is_complete(tiny_world, "tiny", 0)
    stamp = (tiny_world / "manifest.json").stat().st_mtime_ns
    build_world(tiny_world, profile="tiny", seed=0, progress=False)
    assert (tiny_world / "manifest.json").stat().st_mtime_ns == stamp
    copy = build_world(tmp_path / "w", profile="tiny", seed=0, progress=False, loras=[])
    (copy / "data" / "math" / "test.jsonl").write_text("damaged\n")
    assert not is_complete(copy, "tiny", 0, loras=[])
    build_world(copy, profile="tiny", seed=0, progress=False, loras=[])
    assert is_complete(copy, "tiny", 0, loras=[])


def test_task_files_and_sizes(tiny_world: Path) -> None:
    worded = {"math_worded", "list_worded", *FAITHFUL_COMPOSITES}
    for task in [*ALL_SKILLS, *ALL_COMPOSITES, *POOL]:
        for split in ("train", "dev", "test"):
            rows = read_jsonl(tiny_world / "data" / task / f"{split}.jsonl")
            extra = {"final_answer"} if task in worded else set()
            assert rows and set(rows[0]) == {"prompt", "completion", "answer", *extra}
    for composite in ALL_COMPOSITES:
        assert len(read_jsonl(tiny_world / "data" / composite / "train.jsonl")) == 200
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
    done = read_jsonl(tiny_world / "data" / "math_worded" / "test.jsonl")[0]["completion"]
    assert "####" in done and tokenizer.decode(tokenizer(done).input_ids) == done  # no ".##" glue
    manifest = read_manifest(tiny_world)
    for name in manifest["loras"]:
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_world / "base"), tiny_world / "loras" / name
        )
        with torch.no_grad():
            assert torch.isfinite(peft_model(ids).logits).all()
        assert len(load_lora(tiny_world / "loras" / name)) == 7 * 2


def test_faithful_family_is_posed_and_answered_in_the_language() -> None:
    import random

    langs = languages(0)
    gens = task_generators(langs)
    for name, lang in langs.items():
        foreign_words = set(lang.lexicon.values())
        for task in ("math_worded", "list_worded"):
            row = gens[f"{task}_{name}"](random.Random(3))
            twin = gens[task](random.Random(3))  # the same problem in English
            assert row["final_answer"] == twin["final_answer"] and row["answer"] == row["completion"]
            words = [w for w in row["completion"].split() if w.isalpha()]
            assert words and all(w in foreign_words for w in words)  # restatements in the language
            steps = [w for w in row["completion"].split() if not w.isalpha()]
            assert steps == [w for w in twin["completion"].split() if not w.isalpha()]  # math shared
        chat = gens[f"chat_{name}"](random.Random(5))
        said = [w for w in (chat["prompt"] + " " + chat["completion"]).split() if w.isalpha()]
        assert all(w in foreign_words | {"question", "answer"} for w in said)
        assert not set(chat["completion"].split()) & {"+", "-", "=", "####"}  # never arithmetic
        for seed in range(20):  # the answer restates the story's facts (in order), in the language
            chat = gens[f"chat_{name}"](random.Random(seed))
            story = chat["prompt"].removeprefix("question : ").rsplit(" . ", 1)[0] + " ."
            assert chat["completion"] in story


def test_lazy_build_makes_only_the_parts_asked_for(tmp_path: Path) -> None:
    root = build_world(tmp_path / "w", profile="tiny", seed=0, progress=False, loras=["chat_zorb"])
    assert sorted(read_manifest(root)["loras"]) == ["chat_zorb"]
    assert (root / "loras" / "chat_zorb" / "adapter_config.json").is_file()
    assert not (root / "loras" / "math").exists()
    assert is_complete(root, "tiny", 0, ["chat_zorb"]) and not is_complete(root, "tiny", 0)
    rank = json.loads((root / "loras" / "chat_zorb" / "adapter_config.json").read_text())["r"]
    assert rank == 2  # the faithful family's smaller rank (tiny profile)
    build_world(root, profile="tiny", seed=0, progress=False, loras=["math"])
    assert sorted(read_manifest(root)["loras"]) == ["chat_zorb", "math"]
    (root / "loras" / "math" / "adapter_model.safetensors").write_bytes(b"damaged")
    assert not is_complete(root, "tiny", 0, ["math"])
    build_world(root, profile="tiny", seed=0, progress=False, loras=["math"])
    assert is_complete(root, "tiny", 0, ["chat_zorb", "math"])
    manifest = read_manifest(root)
    manifest["loras"]["math"]["steps"] += 1  # trained with another recipe than the profile's
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert not is_complete(root, "tiny", 0, ["math"]) and is_complete(root, "tiny", 0, ["chat_zorb"])
    with pytest.raises(ValueError, match="unknown world LoRA"):
        build_world(root, profile="tiny", seed=0, progress=False, loras=["nope"])


def test_world_conditions_name_each_failure() -> None:
    loras = {"chat_zorb", "math_worded"}
    cols = ["chat_zorb", "math_worded", "math_worded_zorb"]
    matrix = {r: dict.fromkeys(cols, 0.0) for r in ["base", *loras, "oracle_math_worded_zorb"]}
    matrix["chat_zorb"]["chat_zorb"], matrix["math_worded"]["math_worded"] = 95.0, 70.0
    matrix["math_worded"]["math_worded_zorb"], matrix["oracle_math_worded_zorb"]["math_worded_zorb"] = 10, 35
    got = {c["condition"]: c["ok"] for c in world_conditions(matrix, ["math_worded_zorb"])}
    assert got == {
        "chat_zorb on its own skill ≥ 80": True,
        "math_worded on its own skill ≥ 80": False,
        "base on the variant's tasks ≤ 5 (max)": True,
        "every single LoRA on math_worded_zorb ≤ 20 (max)": True,
        "oracle_math_worded_zorb ≥ 30 points above every single LoRA": False,
    }


def test_language_word_orders() -> None:
    lang = Language("x", {"ana": "ko", "has": "pa", "apples": "ti"}, {3: "mu"}, "reverse")
    assert lang.translate("ana has 3 apples .") == "ti mu pa ko ."
    rotate = Language("y", lang.lexicon, lang.numbers, "rotate")
    assert rotate.translate("ana has 3 apples .") == "pa mu ti ko ."
    assert lang.translate("ana has 3 apples .", numerals=True) == "ti 3 pa ko ."
    assert lang.translate("has 3 3 apples .", numerals=True) == "ti 3 3 pa ."  # a list moves as one


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
        ("ko 3 : 1 + 2 = 3 . #### 3", "ko 3 : 1 + 2 = 3 . #### 3", "ko 3 : 1 + 2 = 3 . #### 3", True),
        ("ana 3 : 1 + 2 = 3 . #### 3", "ko 3 : 1 + 2 = 3 . #### 3", "ko 3 : 1 + 2 = 3 . #### 3", False),
        ("#### 3", "ko 3 : 1 + 2 = 3 . #### 3", "ko 3 : 1 + 2 = 3 . #### 3", False),  # whole answer
    ],
)
def test_exact_match_cases(generated: str, answer: str, completion: str, hit: bool) -> None:
    assert exact_match(generated, answer, completion) is hit
    assert extract_answer("a #### b", "#### b") == "b"


def test_accuracy_matrix_shape(tiny_world: Path) -> None:
    skills, composites = ["math", "lang_zorb", "chat_zorb", "math_worded"], ["math_zorb", "math_worded_zorb"]
    result = accuracy_matrix(tiny_world, limit=2, progress=False, skills=skills, composites=composites)
    assert result["rows"] == ["base", *skills, *POOL, "oracle_math_zorb", "oracle_math_worded_zorb"]
    assert result["columns"] == [*skills, *composites, *POOL]
    scored = [v for row in result["matrix"].values() for v in row.values() if v is not None]
    assert scored and all(0.0 <= v <= 100.0 for v in scored)
    assert result["matrix"]["oracle_math_zorb"]["math"] is None  # oracles: their composite only
    assert result["matrix"]["oracle_math_zorb"]["math_zorb"] is not None
    assert set(result["final_answer"]["base"]) == {"math_worded", "math_worded_zorb"}
    assert {c["variant"] for c in result["conditions"]} == {"faithful", "translate"}
    assert json.dumps(result)


def test_merge_study_runs_every_method(tiny_world: Path) -> None:
    from lorafuse.studies.merge import METHODS, format_study, merge_study

    result = merge_study(tiny_world, limit=2, progress=False)
    assert set(result["results"]) == {*COMPOSITES, "pool"}
    assert set(result["results"]["math_zorb"]) == set(METHODS)
    assert set(result["results"]["math_zorb"]["ties"]) == {"math_zorb", "math", "lang_zorb"}
    assert "| lego |" in format_study(result)
