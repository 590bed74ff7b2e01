"""Layers that see tokens flattened to ``(B·T, in)``: OPT's fc1/fc2, Qwen2-MoE's shared expert.

Per-row and per-token bank coefficients reach them through the token→row view of
:func:`lorafuse.runtime.functional.token_rows`. The reference is PEFT with one adapter per row
(PEFT's own ``adapter_names`` refuses these layers: it counts rows of the flattened input).
In transformers 5 the routed experts of MoE models are fused 3-D parameters, not linear layers, so
no bank sees a subset of the tokens (LoRAs targeting them are refused; see test_moe.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lorafuse import attach, load_lora
from lorafuse.fusion.artefact import Fusion
from lorafuse.fusion.flow import flow_for
from lorafuse.runtime import AdapterPool
from lorafuse.serve.dynamic import fusion_rows
from lorafuse.tiny import random_peft_adapter

COMMON = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
COMMON |= {"max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MODELS: dict[str, tuple[dict[str, object], list[str], str]] = {
    "opt": (
        {"ffn_dim": 64, "word_embed_proj_dim": 32},
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "model.decoder.layers.0.fc1",
    ),
    "qwen2_moe": (
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "model.layers.0.mlp.shared_expert.up_proj",
    ),
}


def _maker(kind: str) -> Callable[[], PreTrainedModel]:
    extra, _, _ = MODELS[kind]

    def make() -> PreTrainedModel:
        torch.manual_seed(0)
        config = AutoConfig.for_model(kind, **COMMON, **extra)
        return AutoModelForCausalLM.from_config(config).eval()

    return make


@pytest.fixture(scope="module", params=sorted(MODELS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    kind = request.param
    make = _maker(kind)
    folder = tmp_path_factory.mktemp(kind)
    targets = MODELS[kind][1]
    adapters = [
        random_peft_adapter(make(), folder / n, seed=s, target_modules=targets)
        for n, s in [("a", 1), ("b", 2)]
    ]
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))  # (3, 6)
    return {"kind": kind, "make": make, "adapters": adapters, "ids": ids}


def _per_row_peft(
    world: dict[str, object], rows: list[Path | None], fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    make, ids = world["make"], world["ids"]
    out = []
    for i, adapter in enumerate(rows):
        model = make() if adapter is None else PeftModel.from_pretrained(make(), adapter).eval()  # type: ignore[operator]
        out.append(fn(model, ids[i : i + 1]))  # type: ignore[index]
    return torch.cat(out)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@torch.no_grad()
def test_the_layer_sees_flattened_tokens(world: dict[str, object]) -> None:
    model = world["make"]()  # type: ignore[operator]
    seen: list[tuple[int, ...]] = []
    model.get_submodule(MODELS[world["kind"]][2]).register_forward_pre_hook(
        lambda m, a: seen.append(tuple(a[0].shape))
    )  # type: ignore[index]
    model(input_ids=world["ids"])
    assert seen == [(18, 32)]  # (B·T, hidden): the case this file is about


@torch.no_grad()
def test_peft_adapter_names_refuses_flattened_inputs(world: dict[str, object]) -> None:
    a, b = world["adapters"]  # type: ignore[misc]
    peft = PeftModel.from_pretrained(world["make"](), a, adapter_name="a")  # type: ignore[operator]
    peft.load_adapter(b, adapter_name="b")
    with pytest.raises(ValueError, match="adapter_names"):
        peft(input_ids=world["ids"], adapter_names=["a", "b", "__base__"])


@torch.no_grad()
def test_mixed_batch_equals_one_peft_adapter_per_row(world: dict[str, object]) -> None:
    a, b = world["adapters"]  # type: ignore[misc]
    rows = [a, b, None]
    model = world["make"]()  # type: ignore[operator]
    attach(model, [load_lora(a), load_lora(b)], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(
        _logits(model, world["ids"]), _per_row_peft(world, rows, _logits), atol=1e-5, rtol=1e-5
    )  # type: ignore[arg-type]
    assert torch.equal(_generate(model, world["ids"]), _per_row_peft(world, rows, _generate))  # type: ignore[arg-type]


@torch.no_grad()
def test_pool_mixed_batch_equals_one_peft_adapter_per_row(world: dict[str, object]) -> None:
    a, b = world["adapters"]  # type: ignore[misc]
    model = world["make"]()  # type: ignore[operator]
    pool = AdapterPool(model, initial_rows=4)
    pool.add("a", load_lora(a))
    pool.add("b", load_lora(b))
    want = _per_row_peft(world, [a, b, None], _logits)
    ids = torch.cat([world["ids"], world["ids"][:1]])  # type: ignore[index]
    for table_max_ranks in (0, 64):  # gathered and table kernels
        pool.table_max_ranks, pool.table_ratio = table_max_ranks, 0.0 if table_max_ranks == 0 else 4.0
        plan = pool.plan([[("a", 1.0)], [("b", 1.0)], [], [("a", 1.0)]])
        with pool.use(plan):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, torch.cat([want[:3], want[:1]]), atol=1e-5, rtol=1e-5)


def _random_gates(flow: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["step", "layer"])
def test_lora_flow_equals_its_weights_given_statically(world: dict[str, object], granularity: str) -> None:
    """LoRA-Flow's per-token weights, read back and fed as static per-token weights, give the same
    logits (step gates: one weight tensor for every layer; layer gates: one layer at a time)."""
    a, b = world["adapters"]  # type: ignore[misc]
    loras = [load_lora(a), load_lora(b)]
    model = world["make"]()  # type: ignore[operator]
    handle = attach(model, loras)
    flow = flow_for(handle, granularity=granularity)
    _random_gates(flow, 3)
    flow.record = []
    got = model(input_ids=world["ids"]).logits
    record = dict(flow.record)
    assert all(w.shape == (3, 6, 2) for w in record.values())
    flow.remove()
    reference = world["make"]()  # type: ignore[operator]
    ref_handle = attach(reference, loras)
    for bank in ref_handle.banks.values():
        layer = 0 if granularity == "step" else bank.layer_index
        bank.set_source(type(ref_handle.static)(record[layer], 2))  # type: ignore[index]
    torch.testing.assert_close(got, reference(input_ids=world["ids"]).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_lora_flow_generates_with_and_without_the_cache(world: dict[str, object]) -> None:
    a, b = world["adapters"]  # type: ignore[misc]
    model = world["make"]()  # type: ignore[operator]
    flow = flow_for(attach(model, [load_lora(a), load_lora(b)]))
    _random_gates(flow, 4)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=world["ids"], use_cache=True, **settings)
    uncached = model.generate(input_ids=world["ids"], use_cache=False, **settings)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_served_fusion_rows_equal_the_attached_fusion(world: dict[str, object]) -> None:
    """A pool batch mixing a LoRA-Flow fusion row with plain rows: the fusion row equals the fusion
    attached alone, the plain rows equal their adapters (the same weight rule serves both)."""
    a, b = world["adapters"]  # type: ignore[misc]
    loras = {"a": load_lora(a), "b": load_lora(b)}
    attached = world["make"]()  # type: ignore[operator]
    flow = flow_for(attach(attached, loras))
    _random_gates(flow, 5)
    fusion = Fusion(
        "lora-flow",
        ["a", "b"],
        {"gate.weight": flow.gates.weight.detach().clone(), "gate.bias": flow.gates.bias.detach().clone()},
        gate=flow.config,
    )
    ids = world["ids"]
    want_fusion = attached(input_ids=ids[:1]).logits  # type: ignore[index]
    want_plain = _per_row_peft(world, [None, b, a], _logits)[1:]
    model = world["make"]()  # type: ignore[operator]
    pool = AdapterPool(model, initial_rows=4)
    for key, lora in loras.items():
        pool.add(key, lora)
    plan = pool.plan([[("a", 1.0), ("b", 1.0)], [("b", 1.0)], [("a", 1.0)]])
    plan.dynamic = fusion_rows(model, [(fusion, [0])])
    with pool.use(plan):
        got = model(input_ids=ids).logits
    plan.dynamic.remove()
    torch.testing.assert_close(got[:1], want_fusion, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], want_plain, atol=1e-5, rtol=1e-5)
