"""Mixtures of experts (tiny Mixtral / Qwen2-MoE, transformers 5's fused 3-D expert parameters).

What cannot be a LoRA on linear layers is refused in one line where it is loaded (PEFT
``target_parameters`` adapters; compressed deltas of per-expert checkpoint weights) and, in
``lorafuse serve``, when the adapters folder is scanned: not listed, a JSON 404 with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from lorafuse.compress import compress_checkpoint, decompress, load_compressed
from lorafuse.errors import CompressError, UnsupportedAdapterError
from lorafuse.tiny import random_peft_adapter, save_model, word_tokenizer

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_moe(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised Mixtral (4 experts, top 2) or Qwen2-MoE (+ a shared expert)."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        config = MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        return MixtralForCausalLM(config).eval()
    config = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config).eval()


def fine_tune(model: torch.nn.Module, path: Path, *, experts: bool, seed: int = 1) -> Path:
    """``model`` with its attention queries (and, with ``experts``, its expert weights) moved."""
    tuned = type(model)(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("q_proj.weight") or (experts and ".experts." in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_model(tuned, path)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Mixtral with its word tokenizer, and an adapters folder: a PEFT LoRA on q/v, a PEFT
    LoRA with ``target_parameters`` on the experts, low-rank compressed deltas of a fine-tune of
    the attention only and of one that also moved the experts, and a dense (BitDelta) one."""
    root = tmp_path_factory.mktemp("mixtral")
    model = tiny_moe("mixtral")
    base = save_model(model, root / "base")
    word_tokenizer().save_pretrained(str(base))
    adapters = root / "adapters"
    random_peft_adapter(model, adapters / "attn", seed=1, r=2, target_modules=["q_proj", "v_proj"])
    random_peft_adapter(
        model,
        adapters / "experts",
        seed=2,
        r=2,
        target_modules=["q_proj"],
        target_parameters=EXPERT_PARAMETERS,
    )
    attn_ft = fine_tune(model, root / "ft_attn", experts=False)
    experts_ft = fine_tune(model, root / "ft_experts", experts=True)
    for name, ft, method in [
        ("tuned_attn", attn_ft, "low-rank"),
        ("tuned_experts", experts_ft, "low-rank"),
        ("tuned_sign", attn_ft, "bitdelta"),
    ]:
        compress_checkpoint(base, ft, adapters / name, method=method, budget="1/4", progress=False)
    return {"root": root, "base": base, "adapters": adapters, "ft_attn": attn_ft, "ft_experts": experts_ft}


def test_peft_writes_target_parameters_and_lorafuse_refuses_it_in_one_line(mixtral: dict[str, Any]) -> None:
    from lorafuse.adapters import load_lora

    config = json.loads((mixtral["adapters"] / "experts" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERT_PARAMETERS)
    with pytest.raises(UnsupportedAdapterError, match="target_parameters") as info:
        load_lora(mixtral["adapters"] / "experts")
    assert "\n" not in str(info.value) and "merge_and_unload" in str(info.value)


@pytest.mark.parametrize("verb", ["merge", "fuse", "inspect"])
def test_merge_fuse_inspect_refuse_target_parameters_in_one_line(
    mixtral: dict[str, Any], verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli

    attn, experts = mixtral["adapters"] / "attn", mixtral["adapters"] / "experts"
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "w5 w6", "completion": "w7"}) + "\n")
    args = {
        "merge": ["merge", "-m", "linear", "--out", tmp_path / "m", attn, experts],
        "fuse": ["fuse", "--base", mixtral["base"], "--lora", f"a={attn}", "--lora", f"e={experts}",
                 "--train", tmp_path / "train.jsonl", "--out", tmp_path / "f"],
        "inspect": ["inspect", experts],
    }[verb]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if "target_parameters" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()


def test_compressed_moe_delta_as_a_lora(mixtral: dict[str, Any]) -> None:
    """A delta of per-expert checkpoint weights is refused naming them (the fused experts are no
    linear layers); a delta of the attention only is served as a LoRA exactly."""
    from lorafuse.runtime import attach

    model = AutoModelForCausalLM.from_pretrained(str(mixtral["base"])).eval()
    delta = load_compressed(mixtral["adapters"] / "tuned_experts")
    experts = [p for p in delta.modules if ".experts." in p]
    assert experts and experts[0].startswith("model.layers.0.block_sparse_moe.experts.")  # checkpoint names
    assert not any(p in dict(model.named_modules()) for p in experts)
    with pytest.raises(CompressError) as info:
        delta.to_lora(model=model)
    message = str(info.value)
    assert f"{len(experts)} of its {len(delta.modules)} compressed modules are not linear layers" in message
    assert f"{len(experts)} are per-expert weights of a mixture of experts" in message
    assert experts[0] in message and "lorafuse decompress" in message and "\n" not in message
    delta.to_lora()  # without a model: factors only, as before

    lora = load_compressed(mixtral["adapters"] / "tuned_attn").to_lora(model=model)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    reference = AutoModelForCausalLM.from_pretrained(
        str(decompress(mixtral["adapters"] / "tuned_attn", mixtral["base"], mixtral["root"] / "dec"))
    ).eval()
    attach(model, [lora])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def test_serve_refuses_moe_only_folders_when_scanned(mixtral: dict[str, Any]) -> None:
    """`target_parameters` adapters and deltas of expert weights (or dense deltas) are not listed,
    and naming one is a JSON 404 with the reason, also when hot-added, streamed or composed; the
    servable folders of the same MoE base are served."""
    from lorafuse.serve import Limits, Server, ServeSettings

    adapters = mixtral["adapters"]
    model = AutoModelForCausalLM.from_pretrained(str(mixtral["base"]), dtype=torch.float32).eval()
    settings = ServeSettings(base_name="moe", max_batch=4, threads=1, limits=Limits(max_tokens=32))
    server = Server(model, word_tokenizer(), adapters, settings)
    refused = server.registry.not_servable()
    assert sorted(refused) == ["experts", "tuned_experts", "tuned_sign"]
    assert "target_parameters" in refused["experts"] and "dense" in refused["tuned_sign"]
    with server.background() as url:
        listed = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert listed == {"moe", "attn", "tuned_attn"}
        shutil.copytree(adapters / "experts", adapters / "experts_late")
        bodies = [
            {"model": "experts", "prompt": "w5 w6"},
            {"model": "experts_late", "prompt": "w5 w6"},
            {"model": "experts", "prompt": "w5 w6", "stream": True},
            {"model": "moe", "compose": {"attn": 0.5, "experts": 1.0}, "prompt": "w5"},
            {"model": "tuned_experts", "prompt": "w5 w6"},
        ]
        for body in bodies:
            response = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2})
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert error["code"] == "model_not_servable" and "is not served: " in error["message"]
            assert str(mixtral["root"]) not in error["message"]
        chat = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "experts", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2},
        )
        assert chat.status_code == 404 and "target_parameters" in chat.json()["error"]["message"]
        message = httpx.post(url + "/v1/completions", json={"model": "tuned_experts", "prompt": "w5"}).json()
        assert "per-expert weights of a mixture of experts" in message["error"]["message"]
        assert "experts_late" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        for name in ("attn", "tuned_attn"):
            ok = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "w5 w6", "max_tokens": 3})
            assert ok.status_code == 200, ok.text


def _reference_hessians(
    kind: str, ft: Path, sequences: list[torch.Tensor], layer: int
) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s input Hessians under the checkpoint's names, computed independently of
    lorafuse: the whole model loaded by transformers reads each sequence, the MoE block's input
    is captured, the top-k experts are taken from the loaded router's logits, and each expert's
    projections are applied from the checkpoint's own 2-D weights."""
    from safetensors import safe_open

    model = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()
    block = model.model.layers[layer].mlp
    captured: dict[str, list[torch.Tensor]] = {"attn": [], "moe": []}
    hooks = [
        model.model.layers[layer].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: captured["attn"].append(a[0].reshape(-1, a[0].shape[-1]))
        ),
        block.register_forward_pre_hook(
            lambda m, a: captured["moe"].append(a[0].reshape(-1, a[0].shape[-1]))
        ),
    ]
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=ids.reshape(1, -1), use_cache=False)
    for hook in hooks:
        hook.remove()
    x = torch.cat(captured["moe"]).double()  # (tokens, H)
    top = (x @ block.gate.weight.double().T).topk(model.config.num_experts_per_tok, -1).indices
    moe, names = (
        (f"model.layers.{layer}.block_sparse_moe", ("w1", "w3", "w2"))
        if kind == "mixtral"
        else (f"model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj"))
    )

    def mean_gram(t: torch.Tensor) -> torch.Tensor:
        return (t.T @ t / t.shape[0]).float()

    attn = torch.cat(captured["attn"]).double()
    out = {f"model.layers.{layer}.self_attn.{p}": mean_gram(attn) for p in ("q_proj", "k_proj", "v_proj")}
    out[f"{moe}.gate"] = mean_gram(x)
    with safe_open(str(ft / "model.safetensors"), "pt") as f:
        for e in range(4):
            xe = x[(top == e).any(-1)]
            gate, up, down = (f"{moe}.experts.{e}.{n}" for n in names)
            h = torch.nn.functional.silu(xe @ f.get_tensor(f"{gate}.weight").double().T)
            h = h * (xe @ f.get_tensor(f"{up}.weight").double().T)
            out[gate] = out[up] = mean_gram(xe)
            out[down] = mean_gram(h)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_layer_by_layer_calibration_gives_each_expert_its_routed_tokens_hessian(
    kind: str, tmp_path: Path
) -> None:
    """transformers 5 fuses the experts; the checkpoint (and so the compressed delta) names each
    expert's 2-D weights. Layer-by-layer calibration reads the fused parameters from them and
    gives every checkpoint module, experts and router included, the Hessian an independent
    computation gives (layer 1: its inputs went through layer 0's experts too)."""
    from lorafuse.compress.sequential import iter_layer_hessians

    ft = fine_tune(tiny_moe(kind), tmp_path / "ft", experts=True)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 128, (n,), generator=g) for n in (9, 17, 12)]
    got = dict(iter_layer_hessians(ft, sequences, progress=False))[1]
    expected = _reference_hessians(kind, ft, sequences, layer=1)
    for path, H in expected.items():
        assert path in got, f"{path} has no Hessian; got {sorted(got)[:6]}"
        assert torch.allclose(got[path], H, rtol=1e-4, atol=1e-6), path
    if kind == "qwen2_moe":  # the shared expert is plain linear layers, read as before
        assert "model.layers.1.mlp.shared_expert.down_proj" in got


def test_moe_compression_reports_modules_compressed_without_calibration(
    mixtral: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One calibration token reaches 2 of the 4 experts of each layer: the 2 others' projections
    (2 layers × 2 experts × 3) are compressed without a Hessian, marked `calibrated: false` and
    listed, and the CLI warns in one line; every other stored module was calibrated."""
    from conftest import run_cli
    from lorafuse.compress import collect_hessians

    base, ft = mixtral["base"], mixtral["ft_experts"]
    result = compress_checkpoint(
        base, ft, None, budget="1/4", calibration=[torch.tensor([5])], progress=False
    )
    report = result.info["modules"]
    missing = result.info["uncalibrated"]
    assert len(missing) == 12 and all(".block_sparse_moe.experts." in p for p in missing)
    assert {p.rsplit(".", 1)[1] for p in missing} == {"w1", "w2", "w3"}
    for path in result.modules:
        assert report[path]["calibrated"] is (path not in missing)
        assert ("activation_error" in report[path]) is (path not in missing)
    enough = [torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert (
        compress_checkpoint(
            base, ft, None, method="low-rank", budget="1/4", calibration=enough, progress=False
        ).info["uncalibrated"]
        == []
    )
    # Hessians of the loaded model's linear layers: its fused experts and routers have none
    model = AutoModelForCausalLM.from_pretrained(str(ft)).eval()
    given = collect_hessians(model, enough, progress=False)
    stored = compress_checkpoint(
        base, ft, None, method="low-rank", budget="1/4", hessians=given, progress=False
    )
    assert set(stored.info["uncalibrated"]) == {p for p in stored.modules if "block_sparse_moe" in p}

    (tmp_path / "calib.txt").write_text("w5 w6 w7\n")
    code, _, err = run_cli(
        ["compress", "--base", base, "--finetuned", ft, "--tokenizer", base, "--method", "low-rank",
         "--budget", "1/4", "--calib", tmp_path / "calib.txt", "--samples", "1", "--max-tokens", "1",
         "--out", tmp_path / "c"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "12 of" in warnings[0] and "by weight error only" in warnings[0]
    saved = json.loads((tmp_path / "c" / "compressed.json").read_text())
    assert len(saved["info"]["uncalibrated"]) == 12


def test_experts_of_another_layout_keep_no_hessian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recomputed expert outputs are checked against the block's own on the first sample: an
    experts module that computes something else gets no (wrong) Hessians; the rest still do."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from lorafuse.compress.sequential import iter_layer_hessians

    ft = fine_tune(tiny_moe("mixtral"), tmp_path / "ft", experts=True)
    original = MixtralExperts.forward
    monkeypatch.setattr(MixtralExperts, "forward", lambda self, *a, **k: 2 * original(self, *a, **k))
    got = dict(iter_layer_hessians(ft, [torch.arange(3, 20)], progress=False))[0]
    assert not any(".experts." in p for p in got)
    assert "model.layers.0.self_attn.q_proj" in got and "model.layers.0.block_sparse_moe.gate" in got
