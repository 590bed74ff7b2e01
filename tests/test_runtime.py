"""The bank runtime on real HF models against PEFT and a dense reference."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import load
from lorafuse import LoRA, LorafuseError, attach, detach, load_lora
from lorafuse.runtime import LoRABank, attached_banks

LLAMA = ["plain", "patterned", "rslora_qv"]


def peft_with(base_dir: Path, adapters: dict[str, Path], names: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(load(base_dir), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_hot_equals_peft(arch: str, request: pytest.FixtureRequest, ids: torch.Tensor) -> None:
    base_dir: Path = request.getfixturevalue(f"{arch}_dir")
    adapters: dict[str, Path] = request.getfixturevalue(f"{arch}_adapters")
    names = list(adapters)
    peft = peft_with(base_dir, adapters, names)
    model = load(base_dir)
    bank = attach(model, {n: load_lora(adapters[n]) for n in names})
    for i, name in enumerate(names):
        peft.set_adapter(name)
        bank.set_weights(torch.eye(len(names))[i])
        diff = (model(ids).logits - peft(ids).logits).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"


@torch.no_grad()
@pytest.mark.parametrize("weights", [[0.7, -0.4, 1.3], [1.0, 1.0, 1.0], [-2.0, 0.0, 0.5]])
def test_weighted_equals_peft_cat_merge(
    weights: list[float], llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    peft = peft_with(llama_dir, llama_adapters, LLAMA)
    peft.add_weighted_adapter(LLAMA, weights, "merged", combination_type="cat")
    peft.set_adapter("merged")
    model = load(llama_dir)
    attach(model, [load_lora(llama_adapters[n]) for n in LLAMA], weights)
    diff = (model(ids).logits - peft(ids).logits).abs().max().item()
    assert diff <= 1e-5


class DenseReference(nn.Module):
    """``base(x) + Σ_i w_i(b, t) · x ΔW_iᵀ`` with dense ``ΔW_i``: an independent implementation."""

    def __init__(self, base: nn.Module, deltas: list[torch.Tensor | None], weights: torch.Tensor) -> None:
        super().__init__()
        self.base, self.deltas, self.weights = base, deltas, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i, delta in enumerate(self.deltas):
            if delta is not None:
                y = y + self.weights[..., i : i + 1] * (x @ delta.T)
        return y


@torch.no_grad()
def test_per_token_weights_equal_dense_reference(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    loras = [load_lora(llama_adapters[n]) for n in LLAMA]
    weights = torch.randn(ids.shape[0], ids.shape[1], 3, generator=torch.Generator().manual_seed(1))
    model = load(llama_dir)
    attach(model, loras, weights)
    got = model(ids).logits

    reference = load(llama_dir)
    for path in set().union(*(lo.modules for lo in loras)):
        parent, _, child = path.rpartition(".")
        deltas = [lo[path].delta() if path in lo.modules else None for lo in loras]
        owner = reference.get_submodule(parent)
        setattr(owner, child, DenseReference(getattr(owner, child), deltas, weights))
    assert (got - reference(ids).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_per_row_weights_equal_separate_runs(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.3, -0.5, 2.0], [0.0, 0.0, 0.0]])
    bank = attach(llama, [load_lora(llama_adapters[n]) for n in LLAMA], rows)
    batched = llama(ids).logits
    for b in range(3):
        bank.set_weights(rows[b])
        assert (llama(ids[b : b + 1]).logits[0] - batched[b]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_named_weights_and_context_manager(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    bank = attach(llama, {n: load_lora(llama_adapters[n]) for n in LLAMA}, {"plain": 1.0})
    plain = llama(ids).logits
    with bank.weights({"patterned": 0.5, "rslora_qv": 2.0}):
        mixed = llama(ids).logits
    assert torch.equal(llama(ids).logits, plain)
    assert (mixed - plain).abs().max().item() > 1e-3
    with pytest.raises(KeyError, match=r"unknown LoRA name\(s\) \['nope'\]"):
        bank.set_weights({"nope": 1.0})


@torch.no_grad()
def test_zero_weights_give_base_exactly(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    base = llama(ids).logits
    attach(llama, [load_lora(llama_adapters["plain"])], [0.0])
    assert torch.equal(llama(ids).logits, base)


@torch.no_grad()
def test_detach_restores_bit_for_bit(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    modules = {n: m for n, m in llama.named_modules()}
    base = llama(ids).logits
    attach(llama, [load_lora(llama_adapters[n]) for n in LLAMA], [0.5, 1.0, -1.0])
    assert len(attached_banks(llama)) == 14
    assert not torch.equal(llama(ids).logits, base)
    detach(llama)
    assert {n: m for n, m in llama.named_modules()} == modules
    assert llama.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())
    assert torch.equal(llama(ids).logits, base)
    assert not attached_banks(llama)


def test_attach_twice_refused(llama: nn.Module, llama_adapters: dict[str, Path]) -> None:
    attach(llama, [load_lora(llama_adapters["plain"])])
    with pytest.raises(LorafuseError, match="already has a LoRA bank attached"):
        attach(llama, [load_lora(llama_adapters["plain"])])


def test_bank_layout(llama: nn.Module, llama_adapters: dict[str, Path]) -> None:
    loras = [load_lora(llama_adapters[n]) for n in LLAMA]
    bank = attach(llama, loras)
    q1 = bank.banks["model.layers.1.self_attn.q_proj"]
    assert q1.ranks == [4, 2, 8] and q1.A.shape == (14, 32) and q1.B.shape == (32, 14)
    assert q1.layer_index == 1
    up0 = bank.banks["model.layers.0.mlp.up_proj"]
    assert up0.ranks == [4, 6, 0]
    assert isinstance(up0, LoRABank) and isinstance(up0.base, nn.Linear)
    assert not any(b.requires_grad for b in q1.buffers())


@torch.no_grad()
def test_generate_with_kv_cache_matches_peft_mixed_batch(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    peft = peft_with(llama_dir, llama_adapters, LLAMA)
    model = load(llama_dir)
    attach(model, [load_lora(llama_adapters[n]) for n in LLAMA], torch.eye(3))
    prompt = ids[:, :5]
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    theirs = peft.generate(input_ids=prompt, adapter_names=LLAMA, **settings)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)
    base = load(llama_dir).generate(prompt, **settings)
    assert not torch.equal(cached, base)


@torch.no_grad()
def test_static_per_token_weights_refuse_generation(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    attach(llama, [load_lora(llama_adapters["plain"])], torch.ones(3, 5, 1))
    with pytest.raises(ValueError, match=r"per-token bank weights have \(batch, seq\) = \(3, 5\)"):
        llama.generate(ids[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_peft(
    dtype: torch.dtype, llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    peft = PeftModel.from_pretrained(load(llama_dir, dtype), llama_adapters["plain"]).eval()
    reference = load(llama_dir)  # fp32 PEFT-free reference
    attach(reference, [load_lora(llama_adapters["plain"])])
    want = reference(ids).logits
    for factor_dtype in (None, torch.float32):
        model = load(llama_dir, dtype)
        bank = attach(model, [load_lora(llama_adapters["plain"])], dtype=factor_dtype)
        assert next(iter(bank.banks.values())).A.dtype == (factor_dtype or dtype)
        got = model(ids).logits
        assert got.dtype == dtype
        ours = (got.float() - want).abs().max().item()
        theirs = (peft(ids).logits.float() - want).abs().max().item()
        assert ours <= 2 * theirs + 0.05, (factor_dtype, ours, theirs)
        bank.set_weights([[1.0], [0.0], [0.5]])  # per row, generating in half precision
        out = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 10)
        row_1 = load(llama_dir, dtype).generate(
            ids[1:2, :4], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert torch.equal(out[1:2], row_1), "a zero-weight row generates like the base"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_bf16_generate(llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor) -> None:
    model = load(llama_dir, torch.bfloat16).cuda()
    attach(model, [load_lora(llama_adapters[n]) for n in LLAMA], torch.eye(3))
    out = model.generate(ids[:, :5].cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 13) and out.device.type == "cuda"


class LearnableWeights(nn.Module):
    """A custom WeightSource: one trainable weight per LoRA, as learned methods will feed."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(k))

    def weights_for(self, bank: LoRABank, x: torch.Tensor) -> torch.Tensor:
        return self.logits.softmax(-1).to(bank.A.dtype)


def test_custom_source_trains_weights_not_factors(
    llama: nn.Module, llama_adapters: dict[str, Path], ids: torch.Tensor
) -> None:
    bank = attach(llama, [load_lora(llama_adapters[n]) for n in LLAMA])
    source = LearnableWeights(bank.k)
    bank.set_source(source)
    loss = llama(ids).logits.square().mean()
    loss.backward()
    assert source.logits.grad is not None and source.logits.grad.abs().sum() > 0
    assert all(b.grad is None for bk in bank.banks.values() for b in (bk.A, bk.B))


def test_lora_list_names(llama: nn.Module, llama_adapters: dict[str, Path]) -> None:
    a = load_lora(llama_adapters["plain"])
    b = LoRA(dict(a.modules), name="plain")
    bank = attach(llama, [a, copy.copy(b)])
    assert bank.names == ["plain", "plain#1"]
