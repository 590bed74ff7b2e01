"""``lorafuse export vllm``: every static served item becomes one PEFT adapter PEFT reloads with
the logits lorafuse gives; dynamic fusions are listed with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from tests.conftest import run_cli
from transformers import AutoModelForCausalLM

from lorafuse import attach, detach, load_lora
from lorafuse.compress import load_compressed
from lorafuse.export import VLLM_MAX_RANKS, export_vllm, vllm_max_rank
from lorafuse.studies.serving import serving_folder


@pytest.fixture(scope="module")
def served(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("served") / "adapters"
    names = serving_folder(tiny_world, folder, random_adapters=3)
    out = folder.parent / "vllm"
    export = export_vllm(
        folder, out, base=tiny_world / "base", compositions={"pair": {"rand0": 0.5, "rand2": 1.5}}
    )
    return {"world": tiny_world, "folder": folder, "names": names, "out": out, "export": export}


def _base(world: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


@torch.no_grad()
def _peft_logits(world: Path, folder: Path) -> torch.Tensor:
    return PeftModel.from_pretrained(_base(world), folder).eval()(_ids()).logits


@torch.no_grad()
def _lorafuse_logits(world: Path, loras: dict[str, Any], weights: list[float]) -> torch.Tensor:
    model = _base(world)
    handle = attach(model, loras)
    handle.set_weights(weights)
    try:
        return model(_ids()).logits
    finally:
        detach(model)


def test_every_item_is_exported_or_has_a_reason(served: dict[str, Any]) -> None:
    items = {i.name: i for i in served["export"].items}
    assert set(items) == {*served["names"]["adapters"], "flow", "catw", "mix", "tuned", "dense", "pair"}
    for name in served["names"]["adapters"]:
        assert items[name].exported_as == "adapter" and items[name].how == "copied"
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (served["out"] / name / file).read_bytes() == (served["folder"] / name / file).read_bytes()
    for name in ("flow", "catw"):
        assert items[name].exported_as is None and "lorafuse's engine" in str(items[name].reason)
    assert items["dense"].exported_as is None and "dense" in str(items["dense"].reason)
    assert items["mix"].parts == pytest.approx({"rand0": 0.6, "rand1": 0.9}) and "cat of" in items["mix"].how
    saved = json.loads((served["out"] / "export.json").read_text())
    assert saved["launch"] == served["export"].launch() and len(saved["items"]) == len(items)


def test_static_fusion_and_composition_equal_the_weighted_bank_in_peft(served: dict[str, Any]) -> None:
    """A static fusion and a weighted composition reload in PEFT with lorafuse's weighted logits."""
    world, folder, out = served["world"], served["folder"], served["out"]
    for name, parts in (("mix", {"rand0": 0.6, "rand1": 0.9}), ("pair", {"rand0": 0.5, "rand2": 1.5})):
        loras = {n: load_lora(folder / n) for n in parts}
        expected = _lorafuse_logits(world, loras, list(parts.values()))
        got = _peft_logits(world, out / name)
        assert (got - expected).abs().max() < 1e-5, name
        ranks = sum(max(m.A.shape[0] for m in lora.modules.values()) for lora in loras.values())
        assert served["export"].items[[i.name for i in served["export"].items].index(name)].rank <= ranks


def test_low_rank_delta_is_a_peft_adapter_with_its_logits(served: dict[str, Any]) -> None:
    world, folder, out = served["world"], served["folder"], served["out"]
    lora = load_compressed(folder / "tuned").to_lora("tuned")
    expected = _lorafuse_logits(world, {"tuned": lora}, [1.0])
    assert (_peft_logits(world, out / "tuned") - expected).abs().max() < 1e-5


def test_launch_line_and_vllm_ranks(served: dict[str, Any]) -> None:
    export = served["export"]
    line = export.launch()
    assert line.startswith("python -m vllm.entrypoints.openai.api_server --model ")
    assert f"--max-lora-rank {export.max_lora_rank}" in line and export.max_lora_rank in VLLM_MAX_RANKS
    assert export.max_lora_rank >= max(i.rank or 0 for i in export.adapters)
    for item in export.adapters:
        assert f"{item.name}={served['out'] / item.name}" in line
    assert vllm_max_rank(1) == 8 and vllm_max_rank(17) == 32 and vllm_max_rank(513) is None
    # One spare LoRA slot: vLLM's CPU build gives rows without a LoRA the last slot's (index -1).
    assert f"--max-loras {len(export.adapters) + 1} " in line


def test_cli_export_and_its_errors(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, base = served["folder"], served["world"] / "base"
    out = tmp_path / "export"
    code, stdout, err = run_cli(
        [
            "export",
            "vllm",
            "--adapters",
            folder,
            "--base",
            base,
            "--out",
            out,
            "--compose",
            "p=rand0:1,rand1:0.25",
        ],
        capsys,
    )
    assert code == 0, err
    assert "flow" in stdout and "not exported" in stdout and "--enable-lora" in stdout.splitlines()[-1]
    assert (out / "p" / "adapter_config.json").is_file()
    for bad, words in (
        (["--compose", "p=rand0"], "is not ADAPTER:WEIGHT"),
        (["--compose", "p=nothere:1"], "nothere"),
        (["--compose", "p=rand0:x"], "is not a number"),
        (["--compose", "rand0=rand1:1"], "already items"),
    ):
        code, _, err = run_cli(
            ["export", "vllm", "--adapters", folder, "--base", base, "--out", tmp_path / "e2", *bad], capsys
        )
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(
        ["export", "vllm", "--adapters", folder, "--base", base, "--out", folder / "x"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e2").exists()


def test_dense_delta_becomes_a_full_model(served: dict[str, Any], tmp_path: Path) -> None:
    """With ``dense=True`` an RTN delta is written as ``base + ΔŴ`` (as ``lorafuse decompress``)."""
    from lorafuse.compress import decompress

    out = tmp_path / "vllm"
    export = export_vllm(served["folder"], out, base=served["world"] / "base", dense=True)
    item = next(i for i in export.items if i.name == "dense")
    assert item.exported_as == "model" and item.folder == "dense"
    reference = decompress(
        served["folder"] / "dense", served["world"] / "base", tmp_path / "ref", progress=False
    )
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out / "dense").eval()(_ids()).logits
        expected = AutoModelForCausalLM.from_pretrained(reference).eval()(_ids()).logits
    assert torch.equal(got, expected)
    assert " dense=" not in export.launch()  # a full model is served as a base of its own


def test_exported_tokenizer_adds_lorafuses_bos(served: dict[str, Any], tmp_path: Path) -> None:
    """vLLM tokenizes a text prompt with the tokenizer's own specials; the world's adds no BOS
    where lorafuse prompts with ``<s> text``, so the export writes a copy that adds it."""
    from transformers import AutoTokenizer

    from lorafuse._data import encode_prompt

    export, out, world = served["export"], served["out"], served["world"]
    assert export.tokenizer == str(out / "tokenizer") and export.dtype == "float32"
    assert f"--tokenizer {out / 'tokenizer'} --dtype float32 --enable-lora" in export.launch()
    original = AutoTokenizer.from_pretrained(world / "tokenizer")
    copied = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompt = json.loads((world / "data" / "math" / "test.jsonl").open().readline())["prompt"]
    assert original(prompt)["input_ids"] != encode_prompt(original, prompt)  # the world's adds none
    assert copied(prompt)["input_ids"] == encode_prompt(original, prompt)
    assert copied(prompt)["input_ids"][0] == original.bos_token_id
    assert copied(prompt, add_special_tokens=False)["input_ids"] == encode_prompt(original, prompt)[1:]
    assert json.loads((out / "export.json").read_text())["tokenizer"] == export.tokenizer

    # A base holding a tokenizer that already agrees is served with its own: no --tokenizer.
    base = tmp_path / "base"
    shutil.copytree(world / "base", base)
    for file in (out / "tokenizer").iterdir():
        shutil.copyfile(file, base / file.name)
    own = export_vllm(served["folder"], tmp_path / "own", base=base, dtype="bfloat16")
    assert own.tokenizer is None and "--tokenizer" not in own.launch() and "--dtype bfloat16" in own.launch()
    assert not (tmp_path / "own" / "tokenizer").exists()
    # A tokenizer folder apart from the base that agrees is passed as it is.
    apart = export_vllm(served["folder"], tmp_path / "apart", base=world / "base", tokenizer=base)
    assert apart.tokenizer == str(base) and f"--tokenizer {base} " in apart.launch()


def test_export_without_a_tokenizer_or_with_a_bad_dtype_fails(served: dict[str, Any], tmp_path: Path) -> None:
    from lorafuse.export import ExportError

    base = tmp_path / "base"
    shutil.copytree(served["world"] / "base", base)
    with pytest.raises(ExportError, match="no tokenizer in"):
        export_vllm(served["folder"], tmp_path / "x", base=base)
    with pytest.raises(ExportError, match="dtype 'half'"):
        export_vllm(served["folder"], tmp_path / "y", base=served["world"] / "base", dtype="half")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
