"""LoRA-Flow gates, the task-level baselines and the shared training loop.

Gate maths on torch.randn; the fused forward against an independent dense implementation; the KV
cache; training only the gates, dev-set checkpoint choice, resume after an interruption; saved
fusions round-trip and refuse LoRAs that changed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load
from lorafuse import load_lora
from lorafuse._data import collate, encode_examples
from lorafuse.fusion import (
    FlowGates,
    FuseSettings,
    FusionFormatError,
    GateConfig,
    fit_on_bank,
    flow_for,
    fuse,
    gate_weights,
    load_fusion,
    random_like,
    save_fusion,
)
from lorafuse.fusion.api import FLOW_TRAIN
from lorafuse.fusion.cat_weights import CatWeights
from lorafuse.fusion.lorahub import LoraHubConfig, lorahub_search
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train import train
from lorafuse.train.loop import TrainConfig, batch_schedule, lr_at


def test_gate_starts_as_task_lora_only_and_adds_bias_after_softmax() -> None:
    gates = FlowGates(GateConfig(k=2, hidden_size=8, num_layers=3))
    x = torch.randn(2, 5, 8)  # (B, T, hidden)
    assert torch.equal(gates(x, 1), torch.tensor([0.0, 1.0]).expand(2, 5, 2))
    assert torch.allclose(gates.bias[0], torch.tensor([-0.5, 0.5]))
    w, b = torch.randn(2, 8), torch.randn(2)
    expected = torch.softmax(x @ w.T / 2.0, -1) + b  # the paper's formula, bias after the softmax
    assert torch.allclose(gate_weights(x, w, b, temperature=2.0), expected, atol=1e-6)
    inside = gate_weights(x, w, b, bias_in_softmax=True)
    assert torch.allclose(inside, torch.softmax(x @ w.T + b, -1), atol=1e-6)
    assert torch.allclose(inside.sum(-1), torch.ones(2, 5))


def test_gate_parameter_count() -> None:
    config = GateConfig(k=2, hidden_size=4096, num_layers=32)
    assert config.num_params == 32 * 4096 * 2 + 32 * 2 == 262_208  # the paper's 0.26M for Llama-2-7B
    gates = FlowGates(GateConfig(k=3, hidden_size=32, num_layers=2))
    assert sum(p.numel() for p in gates.parameters()) == 2 * 32 * 3 + 2 * 3 == gates.config.num_params
    assert GateConfig(k=2, hidden_size=32, num_layers=2, granularity="step").num_params == 32 * 2 + 2
    module = GateConfig(k=2, hidden_size=32, num_layers=2, granularity="module", module_paths=("a", "b", "c"))
    assert module.num_params == 3 * (32 * 2 + 2)


def _random_gates(flow: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _dense_flow_logits(
    model: nn.Module, loras: list, weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """An independent implementation: hooks capture each layer's input, linears add Σ w_i ΔW_i x."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    layers = model.model.layers
    for index, layer in enumerate(layers):

        def grab(module, args, kwargs, index=index):  # type: ignore[no-untyped-def]
            x = args[0] if args else kwargs["hidden_states"]
            captured[index] = torch.softmax(x @ weight[index].T, -1) + bias[index]  # (B, T, k)

        hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    originals = {}
    for path, module in model.named_modules():
        if any(path in lo.modules for lo in loras):
            originals[path] = module

            def patched(x, module=module, path=path):  # type: ignore[no-untyped-def]
                layer = int(path.split(".")[2])
                out = nn.functional.linear(x, module.weight)
                for i, lo in enumerate(loras):
                    if path in lo.modules:
                        out = out + captured[layer][..., i : i + 1] * (x @ lo.modules[path].delta().T)
                return out

            module.forward = patched
    try:
        return model(ids).logits
    finally:
        for h in hooks:
            h.remove()
        for module in originals.values():
            del module.forward


@pytest.mark.parametrize("granularity", ["layer", "step"])
def test_flow_forward_equals_dense_reference(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor, granularity: str
) -> None:
    loras = [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["patterned"])]
    model = load(llama_dir)
    handle = attach(model, loras)
    flow = flow_for(handle, granularity=granularity)
    _random_gates(flow, 0)
    with torch.no_grad():
        got = model(ids).logits
    weight, bias = flow.gates.weight.detach(), flow.gates.bias.detach()
    if granularity == "step":  # one gate, reading the first layer's input, for every layer
        captured: dict[str, torch.Tensor] = {}
        detach(model)
        hook = model.model.layers[0].register_forward_pre_hook(
            lambda m, a, k: (
                captured.__setitem__("w", torch.softmax(a[0] @ weight[0].T, -1) + bias[0])
                if a
                else captured.__setitem__("w", torch.softmax(k["hidden_states"] @ weight[0].T, -1) + bias[0])
            ),
            with_kwargs=True,
        )
        with torch.no_grad():
            model(ids)
        hook.remove()
        static = attach(model, loras)
        static.set_weights(captured["w"])
        with torch.no_grad():
            expected = model(ids).logits
    else:
        detach(model)
        with torch.no_grad():
            expected = _dense_flow_logits(model, loras, weight, bias, ids)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_flow_generation_with_kv_cache_equals_without(
    llama_dir: Path, llama_adapters: dict[str, Path]
) -> None:
    model = load(llama_dir)
    handle = attach(model, [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["rslora_qv"])])
    _random_gates(flow_for(handle), 1)
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cat_weights_start_at_the_average(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    model = load(llama_dir)
    handle = attach(model, [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["patterned"])])
    with torch.no_grad(), handle.weights([0.5, 0.5]):
        average = model(ids).logits
    handle.set_source(CatWeights(list(handle.banks), 2))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, average, atol=1e-6)


def test_lorahub_search_finds_a_known_optimum() -> None:
    target = torch.tensor([0.8, -0.6, 1.2])  # LoraHub's own budget: 40 evaluations
    weights, history = lorahub_search(
        lambda w: float(((w - target) ** 2).sum()), 3, LoraHubConfig(budget=40, l1=0.0), progress=False
    )
    assert len(history) == 40 and min(history) < 0.05 < history[0]
    assert torch.allclose(weights, target, atol=0.2)
    again, _ = lorahub_search(
        lambda w: float(((w - target) ** 2).sum()), 3, LoraHubConfig(budget=40, l1=0.0), progress=False
    )
    assert torch.equal(weights, again)  # seeded


def test_random_like_keeps_shapes_scales_and_std(llama_adapters: dict[str, Path]) -> None:
    lora = load_lora(llama_adapters["patterned"])
    rand = random_like(lora, 0)
    assert rand.modules.keys() == lora.modules.keys()
    for path, m in lora.modules.items():
        r = rand.modules[path]
        assert r.A.shape == m.A.shape and r.B.shape == m.B.shape and r.scale == m.scale
        assert not torch.equal(r.A, m.A)
    real = torch.cat([m.A.flatten() for m in lora.modules.values()]).std()
    fake = torch.cat([m.A.flatten() for m in rand.modules.values()]).std()
    assert abs(float(fake / real) - 1) < 0.2


def test_schedule_and_lr() -> None:
    schedule = batch_schedule(10, 4, 6, seed=0)
    assert sorted(schedule[0] + schedule[1] + schedule[2][:2]) == list(range(10))  # one epoch first
    assert schedule == batch_schedule(10, 4, 6, seed=0)
    config = TrainConfig(steps=10, lr=1.0, warmup=0.2)
    assert lr_at(0, config) == 0.5 and lr_at(1, config) == 1.0 and lr_at(9, config) < 0.05


@pytest.fixture(scope="module")
def world_task(tiny_world: Path):  # type: ignore[no-untyped-def]
    tokenizer, _ = load_world(tiny_world)
    data = tiny_world / "data" / "math_zorb"
    train_rows, dev_rows = read_jsonl(data / "train.jsonl")[:64], read_jsonl(data / "dev.jsonl")
    return (
        tokenizer,
        encode_examples(tokenizer, train_rows),
        encode_examples(tokenizer, dev_rows),
        train_rows,
        dev_rows,
    )


def _world_bank(tiny_world: Path):  # type: ignore[no-untyped-def]
    _, model = load_world(tiny_world)
    loras = {
        "lang": load_lora(tiny_world / "loras" / "lang_zorb"),
        "math": load_lora(tiny_world / "loras" / "math"),
    }
    return model, attach(model, loras)


def test_training_moves_only_the_gates_and_keeps_the_best_dev_checkpoint(
    tiny_world: Path, world_task
) -> None:  # type: ignore[no-untyped-def]
    tokenizer, train_data, dev_data, _, _ = world_task
    model, handle = _world_bank(tiny_world)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    banks_before = {p: (b.A.clone(), b.B.clone()) for p, b in handle.banks.items()}
    settings = FuseSettings(train=replace(FLOW_TRAIN, epochs=1, lr=5e-2, eval_every=4))
    fusion = fit_on_bank(
        handle, train_data, dev_data, settings, pad_id=tokenizer.pad_token_id, progress=False
    )
    result = fusion.info["result"]
    assert result["steps"] == 16 and len(result["dev_losses"]) == 4
    assert result["best_dev_loss"] == min(loss for _, loss in result["dev_losses"])
    from lorafuse.train.loop import dev_loss

    assert dev_loss(model, dev_data, tokenizer.pad_token_id) == pytest.approx(
        result["best_dev_loss"], rel=1e-5
    )
    assert not torch.equal(fusion.tensors["gate.weight"], torch.zeros_like(fusion.tensors["gate.weight"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(
        torch.equal(banks_before[p][0], b.A) and torch.equal(banks_before[p][1], b.B)
        for p, b in handle.banks.items()
    )
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


def test_interrupted_training_resumes_to_the_same_gate(tiny_world: Path, world_task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer, train_data, dev_data, _, _ = world_task
    config = replace(FLOW_TRAIN, steps=10, lr=5e-2, eval_every=5, save_every=3)

    def run(checkpoint: Path | None, stop_at: int | None = None) -> torch.Tensor:
        model, handle = _world_bank(tiny_world)
        flow = flow_for(handle)

        def interrupt(step: int, loss: float) -> None:
            if step == stop_at:
                raise KeyboardInterrupt

        train(
            model,
            flow.parameters(),
            train_data,
            config,
            pad_id=tokenizer.pad_token_id,
            dev_data=dev_data,
            checkpoint_dir=checkpoint,
            progress=False,
            on_step=interrupt,
        )
        return torch.cat([p.detach().flatten() for p in flow.parameters()])

    straight = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt", stop_at=7)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 6
    resumed = run(tmp_path / "ckpt")
    assert torch.allclose(resumed, straight, atol=1e-6)
    with pytest.raises(ValueError, match="another run"):
        model, handle = _world_bank(tiny_world)
        train(
            model,
            flow_for(handle).parameters(),
            train_data[:10],
            config,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )


@pytest.mark.parametrize("method", ["lora-flow", "cat", "lorahub", "average"])
def test_fusion_saves_loads_and_gives_the_same_logits(
    tiny_world: Path, world_task, tmp_path: Path, method: str
) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, _, train_rows, dev_rows = world_task
    tokenizer, model = load_world(tiny_world)
    loras = {"lang": tiny_world / "loras" / "lang_zorb", "math": tiny_world / "loras" / "math"}
    train_config = replace(FLOW_TRAIN, steps=4, lr=5e-2)
    settings = FuseSettings(method=method, train=train_config, lorahub=LoraHubConfig(budget=5))  # type: ignore[arg-type]
    fusion = fuse(
        model, tokenizer, loras, train_rows[:16], dev_rows[:8], settings, keep_attached=True, progress=False
    )
    batch = collate(encode_examples(tokenizer, dev_rows[:4]), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    detach(model)
    save_fusion(fusion, tmp_path / "fusion")
    loaded = load_fusion(tmp_path / "fusion")
    assert loaded.lora_names == ["lang", "math"] and loaded.num_params == fusion.num_params
    loaded.attach(model)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_fusion_refuses_changed_or_missing_loras(tiny_world: Path, world_task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, _, train_rows, _ = world_task
    _, model = load_world(tiny_world)
    copy_dir = Path(shutil.copytree(tiny_world / "loras" / "math", tmp_path / "math"))
    fusion = fuse(
        model,
        tokenizer,
        {"lang": tiny_world / "loras" / "lang_zorb", "math": copy_dir},
        train_rows[:8],
        method="average",
        progress=False,
    )
    save_fusion(fusion, tmp_path / "fusion")
    config = json.loads((copy_dir / "adapter_config.json").read_text())
    config["lora_alpha"] = 1
    (copy_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FusionFormatError, match="SHA-256 mismatch"):
        load_fusion(tmp_path / "fusion").load_loras()
    shutil.rmtree(copy_dir)
    with pytest.raises(FusionFormatError, match="--lora math=DIR"):
        load_fusion(tmp_path / "fusion").load_loras()
    (tmp_path / "fusion" / "fusion.json").write_text('{"format": "other"}')
    with pytest.raises(FusionFormatError, match="expected 'lorafuse-fusion'"):
        load_fusion(tmp_path / "fusion")
    with pytest.raises(FusionFormatError, match="not a fusion folder"):
        load_fusion(tmp_path)


def test_gates_stay_out_of_the_model_parameters(llama_dir: Path, llama_adapters: dict[str, Path]) -> None:
    model = load(llama_dir)
    handle = attach(model, [load_lora(llama_adapters["plain"])] * 2)
    before = set(model.state_dict())
    flow = flow_for(handle)
    assert set(model.state_dict()) == before
    gate_ids = {id(p) for p in flow.parameters()}
    assert not gate_ids & {id(p) for p in model.parameters()}


@pytest.mark.parametrize("granularity", ["layer", "module", "step"])
def test_gradient_checkpointing_gives_the_same_gate_gradients(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor, granularity: str
) -> None:
    from lorafuse.train.loop import gradient_checkpointing

    loras = [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["patterned"])]
    grads = []
    for enabled in (False, True):
        model = load(llama_dir)
        flow = flow_for(attach(model, loras), granularity=granularity)
        _random_gates(flow, 0)
        model.train()
        with gradient_checkpointing(model, enabled):
            assert model.model.gradient_checkpointing is enabled
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        assert not model.model.gradient_checkpointing  # switched off again
        grads.append([p.grad.clone() for p in flow.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_bf16_base_trains_fp32_gates(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    from lorafuse.train.loop import train

    model = load(llama_dir, torch.bfloat16)
    loras = [load_lora(llama_adapters["plain"]), load_lora(llama_adapters["patterned"])]
    flow = flow_for(attach(model, loras))
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    data = [(row, row) for row in ids.tolist()]
    config = TrainConfig(steps=3, batch_size=3, lr=5e-2, gradient_checkpointing=True)
    result = train(model, flow.parameters(), data, config, progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    assert flow.gates.weight.abs().sum() > 0  # the gates moved
