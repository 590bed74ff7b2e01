"""The serving pool: per-row adapters and compositions equal the fixed bank and PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tests.conftest import load

from lorafuse import attach, load_lora
from lorafuse.runtime.functional import gathered_delta, table_delta
from lorafuse.runtime.pool import AdapterPool


def test_gathered_equals_table_equals_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g)  # (B, T, in)
    A = torch.randn(6, 8, generator=g)  # (N, in)
    B = torch.randn(6, 5, generator=g)  # (N, out)
    index = torch.tensor([[1, 2, 0], [3, 4, 5], [1, 2, 0]])  # (B, R)
    coef = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, -2.0], [0.3, 0.3, 0.0]]).unsqueeze(1)  # (B, 1, R)
    expected = torch.stack(
        [((x[b] @ A[index[b]].T) * coef[b]) @ B[index[b]] for b in range(3)]
    )  # (B, T, out)
    torch.testing.assert_close(gathered_delta(x, A[index], B[index], coef), expected)
    used, position = torch.unique(index, return_inverse=True)
    wide = torch.zeros(3, 1, used.numel()).scatter_add_(2, position.unsqueeze(1), coef)
    torch.testing.assert_close(table_delta(x, A[used], B[used], wide), expected)


@pytest.mark.parametrize("kernel", ["gathered", "table"])
def test_pool_rows_equal_fixed_bank(llama_dir: Path, llama_adapters: dict[str, Path], kernel: str) -> None:
    loras = {name: load_lora(path) for name, path in llama_adapters.items()}
    ids = torch.randint(3, 100, (4, 7), generator=torch.Generator().manual_seed(1))  # (B, T)
    rows = [
        {"plain": 1.0},
        {"patterned": 0.7, "rslora_qv": 0.5},
        {},
        {"rslora_qv": 1.0, "plain": -0.25, "patterned": 2.0},
    ]
    reference = load(llama_dir)
    handle = attach(reference, loras)
    weights = torch.stack([handle.weight_vector(r) for r in rows])  # (B, k)
    handle.set_weights(weights)
    expected = reference(ids).logits

    model = load(llama_dir)
    pool = AdapterPool(
        model, initial_rows=4, table_max_ranks=10_000 if kernel == "table" else 0, table_ratio=0
    )
    for name, lora in loras.items():
        pool.add(name, lora)
    plan = pool.plan([list(r.items()) for r in rows])
    assert plan.kernel == kernel
    with pool.use(plan):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        base = load(llama_dir)(ids).logits
    torch.testing.assert_close(model(ids).logits, base)  # no plan = the base model


def test_pool_matches_peft_single_adapter(llama_dir: Path, llama_adapters: dict[str, Path]) -> None:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    peft = PeftModel.from_pretrained(load(llama_dir), str(llama_adapters["patterned"])).eval()
    expected = peft(input_ids=ids).logits
    model = load(llama_dir)
    pool = AdapterPool(model)
    pool.add("p", load_lora(llama_adapters["patterned"]))
    with pool.use(pool.plan([[("p", 1.0)], [("p", 1.0)]])):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pool_evicts_lru_unused_and_reuses_rows(llama_dir: Path, llama_adapters: dict[str, Path]) -> None:
    loras = {name: load_lora(path) for name, path in llama_adapters.items()}
    model = load(llama_dir)
    pool = AdapterPool(model, initial_rows=2)  # grows as needed
    for name, lora in loras.items():
        pool.add(name, lora)
    pool.touch("plain")
    pool.adapters["rslora_qv"].refs = 1  # in use by a batch row: never evicted
    assert pool.evict(keep=2) == ["patterned"]
    assert list(pool.adapters) == ["rslora_qv", "plain"]
    pool.adapters["rslora_qv"].refs = 0
    assert pool.evict(keep=1) == ["rslora_qv"]
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    reference = load(llama_dir)
    attach(reference, {"plain": loras["plain"]})
    pool.add("patterned", loras["patterned"])  # reuses freed rows, which were zeroed
    with pool.use(pool.plan([[("plain", 1.0)]])):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert pool.detach() is model
    assert not any(type(m).__name__ == "LoRABank" for m in model.modules())


def test_pool_in_bfloat16_follows_the_model_dtype(llama_dir: Path, llama_adapters: dict[str, Path]) -> None:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    lora = load_lora(llama_adapters["plain"])
    reference = load(llama_dir, torch.bfloat16)
    attach(reference, {"p": lora})
    model = load(llama_dir, torch.bfloat16)
    pool = AdapterPool(model)
    pool.add("p", lora)
    assert next(iter(pool.banks.values())).A.dtype == torch.bfloat16
    with pool.use(pool.plan([[("p", 1.0)], [("p", 1.0)]])):
        got = model(ids).logits
    torch.testing.assert_close(got.float(), reference(ids).logits.float(), atol=0.05, rtol=0.05)
