"""Every bad input gets a clear error that names the file, module and shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load
from lorafuse import (
    AdapterFormatError,
    CompatibilityError,
    LoRA,
    LoRAModule,
    PickleRefusedError,
    UnsupportedAdapterError,
    attach,
    check_compatible,
    load_lora,
)
from lorafuse.tiny import random_peft_adapter, tiny_llama

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture()
def adapter(llama_adapters: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of a valid adapter to break."""
    return Path(shutil.copytree(llama_adapters["plain"], tmp_path / "broken"))


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    state = load_file(folder / WEIGHTS)
    fn(state)
    save_file(state, str(folder / WEIGHTS))


def test_missing_folder_and_config(tmp_path: Path, adapter: Path) -> None:
    with pytest.raises(AdapterFormatError, match="not a folder"):
        load_lora(tmp_path / "nope")
    (adapter / CONFIG).unlink()
    with pytest.raises(AdapterFormatError, match=rf"{CONFIG}: missing"):
        load_lora(adapter)


def test_empty_and_invalid_config(adapter: Path) -> None:
    (adapter / CONFIG).write_text("")
    with pytest.raises(AdapterFormatError, match=rf"{CONFIG}: the file is empty"):
        load_lora(adapter)
    (adapter / CONFIG).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="invalid JSON"):
        load_lora(adapter)


def test_not_lora(adapter: Path) -> None:
    edit_config(adapter, peft_type="IA3")
    with pytest.raises(UnsupportedAdapterError, match="peft_type is 'IA3'"):
        load_lora(adapter)


def test_dora_refused(llama_dir: Path, tmp_path: Path) -> None:
    folder = random_peft_adapter(load(llama_dir), tmp_path / "dora", seed=0, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="use_dora is true"):
        load_lora(folder)


def test_modules_to_save_reported(llama_dir: Path, tmp_path: Path) -> None:
    folder = random_peft_adapter(load(llama_dir), tmp_path / "mts", seed=0, modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedAdapterError, match=r"modules_to_save=\['lm_head'\] is not supported"):
        load_lora(folder)


def test_embedding_lora_refused(llama_dir: Path, tmp_path: Path) -> None:
    folder = random_peft_adapter(
        load(llama_dir), tmp_path / "emb", seed=0, target_modules=["embed_tokens", "q_proj"]
    )
    with pytest.raises(UnsupportedAdapterError, match="lora_embedding_A"):
        load_lora(folder)


def test_empty_weights_file(adapter: Path) -> None:
    (adapter / WEIGHTS).write_bytes(b"")
    with pytest.raises(AdapterFormatError, match=rf"{WEIGHTS}: the file is empty \(0 bytes\)"):
        load_lora(adapter)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 10_000])
def test_truncated_weights_file(adapter: Path, keep: float) -> None:
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: max(9, int(len(data) * keep))])
    with pytest.raises(AdapterFormatError, match=rf"{WEIGHTS}: truncated safetensors file"):
        load_lora(adapter)


def test_garbage_weights_file(adapter: Path) -> None:
    (adapter / WEIGHTS).write_bytes((12).to_bytes(8, "little") + b"not a header")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        load_lora(adapter)


def test_missing_weights_file(adapter: Path) -> None:
    (adapter / WEIGHTS).unlink()
    with pytest.raises(AdapterFormatError, match=f"no {WEIGHTS}"):
        load_lora(adapter)


def test_non_finite_values(adapter: Path) -> None:
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    def poison(state: dict[str, torch.Tensor]) -> None:
        state[key][3, 1] = float("nan")
        state[key][0, 0] = float("inf")

    edit_tensors(adapter, poison)
    with pytest.raises(
        AdapterFormatError,
        match=r"model.layers.1.mlp.up_proj.lora_B.weight \(64, 4\) has 2 non-finite",
    ):
        load_lora(adapter)


def test_wrong_dtype(adapter: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(adapter, lambda s: s.__setitem__(key, s[key].to(torch.int32)))
    with pytest.raises(
        AdapterFormatError, match=r"expected floating-point tensors .*k_proj.lora_A.weight \(I32\)"
    ):
        load_lora(adapter)


def test_config_disagrees_with_tensors(adapter: Path) -> None:
    edit_config(adapter, r=16)
    with pytest.raises(
        AdapterFormatError,
        match=r"config disagrees with the tensors: model.layers.0.mlp.down_proj has rank 4 .* r=16",
    ):
        load_lora(adapter)


def test_unpaired_factor(adapter: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    edit_tensors(adapter, lambda s: s.pop(key))
    with pytest.raises(AdapterFormatError, match=r"model.layers.0.self_attn.o_proj has no lora_B.weight"):
        load_lora(adapter)


def test_inconsistent_factor_shapes(adapter: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    edit_tensors(adapter, lambda s: s.__setitem__(key, torch.zeros(32, 3)))
    with pytest.raises(AdapterFormatError, match=r"o_proj: lora_A \(4, 32\) and lora_B \(32, 3\)"):
        load_lora(adapter)


def test_keys_with_adapter_name_segment(adapter: Path) -> None:
    """Older PEFT versions saved ``...lora_A.default.weight``; both spellings load the same."""
    plain = load_lora(adapter)
    state = load_file(adapter / WEIGHTS)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    save_file(renamed, str(adapter / WEIGHTS))
    again = load_lora(adapter)
    assert again.ranks == plain.ranks
    assert all(torch.equal(again[p].A, m.A) for p, m in plain.modules.items())
    two = {**renamed, **{k.replace(".default.", ".other."): v.clone() for k, v in renamed.items()}}
    save_file(two, str(adapter / WEIGHTS))
    with pytest.raises(AdapterFormatError, match=r"holds several adapters \['default', 'other'\]"):
        load_lora(adapter)


def test_pickle_refused_unless_opted_in(adapter: Path) -> None:
    state = load_file(adapter / WEIGHTS)
    (adapter / WEIGHTS).unlink()
    torch.save(state, adapter / "adapter_model.bin")
    with pytest.raises(PickleRefusedError, match=r"adapter_model.bin: pickle-based weights are refused"):
        load_lora(adapter)
    lora = load_lora(adapter, allow_pickle=True)
    assert len(lora) == 14


def test_pickle_opt_in_still_refuses_code(adapter: Path) -> None:
    (adapter / WEIGHTS).unlink()
    torch.save({"x": torch.zeros(1), "obj": object.__new__(Exploit)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="weights_only=True"):
        load_lora(adapter, allow_pickle=True)


class Exploit:
    pass


def test_check_compatible_lists_every_problem(llama_adapters: dict[str, Path]) -> None:
    lora = load_lora(llama_adapters["plain"])
    other = tiny_llama(0, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(CompatibilityError) as info:
        check_compatible(lora, other)
    message = str(info.value)
    assert "missing module model.layers.1.self_attn.q_proj" in message
    assert (
        "shape mismatch at model.layers.0.self_attn.q_proj: the model's layer is (out, in) = "
        "(48, 48), the LoRA gives (32, 32)" in message
    )
    assert message.count("missing module") == 7 and message.count("shape mismatch") == 7
    assert "plain" in message


def test_check_compatible_rejects_non_linear(llama: torch.nn.Module) -> None:
    lora = LoRA({"model.embed_tokens": LoRAModule(torch.zeros(2, 128), torch.zeros(32, 2), 1.0)}, name="emb")
    with pytest.raises(CompatibilityError, match="model.embed_tokens is a Embedding, not a linear layer"):
        check_compatible(lora, llama)


def test_failed_attach_leaves_model_untouched(
    llama: torch.nn.Module, llama_adapters: dict[str, Path]
) -> None:
    good = load_lora(llama_adapters["plain"])
    bad = LoRA(
        {"model.layers.9.mlp.up_proj": LoRAModule(torch.zeros(1, 32), torch.zeros(64, 1), 1.0)},
        name="bad",
    )
    before = {n: id(m) for n, m in llama.named_modules()}
    with pytest.raises(CompatibilityError, match="missing module model.layers.9.mlp.up_proj"):
        attach(llama, [good, bad])
    assert {n: id(m) for n, m in llama.named_modules()} == before


def test_config_fields_peft_writes_still_load(adapter: Path) -> None:
    """PEFT compatibility: float alphas, null patterns, fields lorafuse does not interpret."""
    edit_config(
        adapter,
        lora_alpha=7.5,
        rank_pattern=None,
        alpha_pattern={},
        use_dora=None,
        layers_pattern=None,
        megatron_config=None,
        peft_type="lora",
    )
    lora = load_lora(adapter)
    assert {m.scale for m in lora.modules.values()} == {7.5 / 4}
    assert "megatron_config" in lora.metadata and "layers_pattern" in lora.metadata


def test_non_finite_scale_never_reaches_a_module() -> None:
    from lorafuse import LorafuseError

    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(LorafuseError, match="LoRA scale must be a finite number"):
            LoRAModule(torch.zeros(2, 4), torch.zeros(3, 2), scale)


def test_merge_refuses_non_float_dtype_and_non_finite_weights(
    llama_adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli
    from lorafuse import LorafuseError, merge, save_lora

    loras = [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["patterned"])]
    for dtype in (torch.int8, torch.bool, torch.int64):
        with pytest.raises(LorafuseError, match=rf"merge dtype must be a floating-point .* got {dtype}"):
            merge(loras, "linear", dtype=dtype, progress=False)
    for weights in ([float("nan"), 1.0], [1.0, float("inf")], [1e308, 1.0], [True, 1.0]):
        with pytest.raises(LorafuseError, match="merge weight"):
            merge(loras, "cat", weights, progress=False)
    with pytest.raises(LorafuseError, match="merge rank must be a whole number"):
        merge(loras, "svd", rank=4.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(LorafuseError, match="cannot save a LoRA as torch.int8"):
        save_lora(loras[0], tmp_path / "int8", dtype=torch.int8)
    out = tmp_path / "merged"
    inputs = [llama_adapters["plain"], llama_adapters["patterned"]]
    code, _, err = run_cli(["merge", "--method", "linear", "--dtype", "int8", "--out", out, *inputs], capsys)
    assert code == 2 and "int8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "int8").exists()


def test_merge_cli_refuses_an_adapter_with_nan_alpha(
    llama_adapters: dict[str, Path], adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli

    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    out = tmp_path / "merged"
    code, _, err = run_cli(
        ["merge", "--method", "cat", "--out", out, llama_adapters["plain"], adapter], capsys
    )
    assert code == 2 and f"{CONFIG}: lora_alpha: NaN is not a JSON number" in err
    assert "Traceback" not in err and not out.exists()


def _static_fusion(loras: dict[str, Path], base: str, **info: str):  # type: ignore[no-untyped-def]
    from lorafuse.fusion.artefact import Fusion, adapter_hashes

    return Fusion(
        "static",
        list(loras),
        {"weights": torch.full((len(loras),), 1.0 / len(loras))},
        lora_paths={n: str(p) for n, p in loras.items()},
        lora_hashes={n: adapter_hashes(Path(p)) for n, p in loras.items()},
        info={"base_model": base, **info},
    )


def test_fusion_records_absolute_paths_and_generates_from_another_folder(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli
    from lorafuse.fusion import load_fusion, save_fusion

    monkeypatch.chdir(tiny_world.parent)
    world = Path(tiny_world.name)  # relative to the current folder
    loras = {"lang": world / "loras" / "lang_zorb", "math": world / "loras" / "math"}
    save_fusion(_static_fusion(loras, str(world / "base")), tmp_path / "fusion")
    meta = json.loads((tmp_path / "fusion" / "fusion.json").read_text())
    assert meta["info"]["base_model"] == str((world / "base").resolve())
    assert [x["path"] for x in meta["loras"]] == [str(p.resolve()) for p in loras.values()]

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        ["generate", "--fusion", "fusion", "--prompt", "zorb one", "--max-new-tokens", "3"], capsys
    )
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    assert load_fusion("fusion").info["base_model"] == str(tiny_world / "base")


def test_old_fusion_with_relative_paths_resolves_from_its_folder_then_the_cwd(
    llama_adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorafuse.fusion import load_fusion, save_fusion

    library = Path(shutil.copytree(llama_adapters["plain"].parent, tmp_path / "lib"))
    loras = {"plain": library / "plain", "patterned": library / "patterned"}
    folder = save_fusion(_static_fusion(loras, "org/some-hub-model"), tmp_path / "lib" / "fusion")
    meta = json.loads((folder / "fusion.json").read_text())
    meta["loras"][0]["path"] = "../plain"  # written relative to the fusion folder
    meta["loras"][1]["path"] = "lib/patterned"  # written relative to the folder it was made in
    (folder / "fusion.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    fusion = load_fusion(folder)
    assert fusion.lora_paths == {n: str(p.resolve()) for n, p in loras.items()}
    assert fusion.info["base_model"] == "org/some-hub-model"  # a hub name is kept as written
    monkeypatch.chdir(library / "plain")
    assert sorted(fusion.load_loras()) == ["patterned", "plain"]


def test_fusion_loras_without_hashes_are_never_loaded_unchecked(
    llama_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from lorafuse.fusion import FusionFormatError, save_fusion

    fusion = _static_fusion({"plain": llama_adapters["plain"], "rs": llama_adapters["rslora_qv"]}, "b")
    fusion.lora_hashes["rs"] = {}
    with pytest.raises(FusionFormatError, match=r"\['rs'\] have no recorded SHA-256"):
        save_fusion(fusion, tmp_path / "fusion")
    assert not (tmp_path / "fusion").exists()
    with pytest.raises(FusionFormatError, match="LoRA 'rs' of the fusion has no recorded SHA-256"):
        fusion.load_loras()
    assert len(fusion.load_loras(verify=False)) == 2
