"""PEFT-format adapters: load exactly what PEFT wrote, save what PEFT loads, round trips."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import load
from lorafuse import load_lora, save_lora


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def peft_logits(base_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(load(base_dir), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def test_load_reads_ranks_alphas_and_factors(llama_adapters: dict[str, Path]) -> None:
    lora = load_lora(llama_adapters["patterned"])
    state = load_file(llama_adapters["patterned"] / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert lora[q].rank == 2 and lora[q].scale == pytest.approx(12 / 2)
    assert lora["model.layers.1.mlp.down_proj"].rank == 8
    assert lora["model.layers.0.mlp.down_proj"].rank == 6
    assert lora["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3 / 6)
    assert lora["model.layers.0.mlp.up_proj"].scale == pytest.approx(12 / 6)
    assert torch.equal(lora[q].A, state[f"base_model.model.{q}.lora_A.weight"])
    assert torch.equal(lora[q].B, state[f"base_model.model.{q}.lora_B.weight"])
    assert len(lora) == 2 * 7

    rs = load_lora(llama_adapters["rslora_qv"])
    assert rs.module_kinds == ["q_proj", "v_proj"]
    assert rs["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4 / math.sqrt(8))


@pytest.mark.parametrize("which", ["plain", "patterned", "rslora_qv"])
def test_save_loads_in_peft_with_same_logits(
    which: str, llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor, tmp_path: Path
) -> None:
    source = llama_adapters[which]
    before = folder_digest(source)
    saved = save_lora(load_lora(source), tmp_path / "copy")
    assert folder_digest(source) == before, "loading/saving must never modify the input"
    want = peft_logits(llama_dir, source, ids)
    got = peft_logits(llama_dir, saved, ids)
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - load(llama_dir)(ids).logits).abs().max().item() > 1e-2, "adapter must matter"


def test_gpt2_conv1d_round_trip(
    gpt2_dir: Path, gpt2_adapters: dict[str, Path], ids: torch.Tensor, tmp_path: Path
) -> None:
    lora = load_lora(gpt2_adapters["a"])
    assert lora["transformer.h.0.attn.c_attn"].A.shape == (4, 32)
    assert lora["transformer.h.0.attn.c_attn"].B.shape == (96, 4)
    saved = save_lora(lora, tmp_path / "gpt2_copy")
    assert json.loads((saved / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    got = peft_logits(gpt2_dir, saved, ids)
    want = peft_logits(gpt2_dir, gpt2_adapters["a"], ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_round_trip_is_exact(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    original = load_lora(llama_adapters["patterned"])
    again = load_lora(save_lora(original, tmp_path / "rt"))
    assert again.ranks == original.ranks
    for path, module in original.modules.items():
        assert torch.equal(again[path].A, module.A) and torch.equal(again[path].B, module.B)
        assert again[path].scale == pytest.approx(module.scale, rel=1e-12)


def test_save_in_other_dtype(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    saved = save_lora(load_lora(llama_adapters["plain"]), tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(saved / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_save_is_atomic(
    llama_adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = load_lora(llama_adapters["plain"])
    out = save_lora(lora, tmp_path / "out")
    before = folder_digest(out)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lorafuse.adapters.peft_format.write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(load_lora(llama_adapters["patterned"]), out)
    assert folder_digest(out) == before, "a failed save must leave the previous output intact"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folders left behind"
    with pytest.raises(FileExistsError, match="exists"):
        save_lora(lora, out, overwrite=False)


def test_extra_metadata_goes_to_side_file(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    out = save_lora(load_lora(llama_adapters["plain"]), tmp_path / "x", extra={"recipe": {"method": "cat"}})
    assert json.loads((out / "lorafuse.json").read_text()) == {"recipe": {"method": "cat"}}
    assert "recipe" not in json.loads((out / "adapter_config.json").read_text())


def test_attach_of_saved_copy_matches_source(
    llama: torch.nn.Module, llama_adapters: dict[str, Path], tmp_path: Path, ids: torch.Tensor
) -> None:
    from lorafuse import attach, detach

    source = load_lora(llama_adapters["patterned"])
    copy_ = load_lora(save_lora(copy.deepcopy(source), tmp_path / "c"))
    with torch.no_grad():
        attach(llama, [source])
        a = llama(ids).logits
        detach(llama)
        attach(llama, [copy_])
        b = llama(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
