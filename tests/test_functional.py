"""The bank's tensor maths against dense references, on torch.randn (no models)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.adapters.lora import LoRAModule
from lorafuse.runtime.functional import (
    bank_delta,
    check_weights,
    expand_weights,
    rank_index,
    stack_factors,
)

IN, OUT = 12, 10


def random_modules(ranks: list[int], seed: int = 0) -> list[LoRAModule]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoRAModule(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), 0.5 + i)
        for i, r in enumerate(ranks)
    ]


def dense_reference(x: torch.Tensor, modules: list[LoRAModule | None], w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · x ΔW_iᵀ with dense ΔW_i, weights broadcast per (batch, seq) position."""
    out = torch.zeros(*x.shape[:-1], OUT)
    for i, module in enumerate(modules):
        if module is None:
            continue
        wi = w[..., i]
        while wi.ndim < x.ndim - 1:
            wi = wi.unsqueeze(-1)
        out += wi.unsqueeze(-1) * (x @ module.delta().T)
    return out


def bank(modules: list[LoRAModule | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, ranks = stack_factors([None if m is None else (m.A, m.B, m.scale) for m in modules], IN, OUT)
    return a, b, rank_index(ranks)


@pytest.mark.parametrize("shape", ["k", "batch_k", "batch_seq_k"])
def test_bank_equals_dense_sum(shape: str) -> None:
    modules: list[LoRAModule | None] = [*random_modules([3, 5]), None, *random_modules([2], seed=1)]
    a, b, index = bank(modules)
    x = torch.randn(4, 7, IN)
    w = {
        "k": torch.tensor([0.7, -1.2, 3.0, 0.25]),
        "batch_k": torch.randn(4, 4),
        "batch_seq_k": torch.randn(4, 7, 4),
    }[shape]
    got = bank_delta(x, a, b, expand_weights(w, index, x.shape))
    want = dense_reference(x, modules, w if shape != "k" else w.expand(4, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_hot_is_one_lora() -> None:
    modules = random_modules([4, 6, 1])
    a, b, index = bank(list(modules))
    x = torch.randn(5, IN)
    for i, module in enumerate(modules):
        w = torch.nn.functional.one_hot(torch.tensor(i), 3).float()
        got = bank_delta(x, a, b, expand_weights(w, index, x.shape))
        torch.testing.assert_close(got, module.scale * (x @ module.A.T) @ module.B.T)


def test_rank_index_and_absent_loras() -> None:
    assert rank_index([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    a, b, ranks = stack_factors([None, None], IN, OUT)
    assert a.shape == (0, IN) and b.shape == (OUT, 0) and ranks == [0, 0]


def test_weight_errors_name_shapes() -> None:
    with pytest.raises(ValueError, match=r"k=3 LoRAs, got \(2,\)"):
        check_weights(torch.ones(2), 3)
    with pytest.raises(ValueError, match="NaN"):
        check_weights(torch.tensor([1.0, float("nan")]), 2)
    index = rank_index([1, 1])
    with pytest.raises(ValueError, match=r"per-row bank weights have batch 2 .* \(3, 4, 8\)"):
        expand_weights(torch.ones(2, 2), index, torch.Size([3, 4, 8]), "layer.q")
    with pytest.raises(ValueError, match=r"\(batch, seq\) = \(3, 5\) .* \(3, 1, 8\)"):
        expand_weights(torch.ones(3, 5, 2), index, torch.Size([3, 1, 8]))


def test_fro_norm_factored_equals_dense() -> None:
    for module in random_modules([1, 4, 7], seed=3):
        assert module.fro_norm() == pytest.approx(torch.linalg.norm(module.delta()).item(), rel=1e-5)


def test_lora_module_rejects_mismatched_factors() -> None:
    with pytest.raises(ValueError, match=r"A is \(3, 12\).*B is \(10, 4\)"):
        LoRAModule(torch.zeros(3, IN), torch.zeros(OUT, 4), 1.0)


def test_delta_from_lora_and_state_dicts() -> None:
    from lorafuse import Delta, LoRA

    modules = random_modules([2, 3])
    lora = LoRA({"a.q": modules[0], "a.v": modules[1]}, name="x")
    delta = Delta.from_lora(lora)
    torch.testing.assert_close(delta["a.q"], modules[0].delta())
    base = {"a.q.weight": torch.randn(OUT, IN)}
    tuned = {"a.q.weight": base["a.q.weight"] + delta["a.q"]}
    again = Delta.from_state_dicts(base, tuned, ["a.q.weight"])
    torch.testing.assert_close(again["a.q"], delta["a.q"])
    with pytest.raises(ValueError, match=r"a.q.weight: base has shape \(10, 12\), fine-tuned has \(12, 10\)"):
        Delta.from_state_dicts(base, {"a.q.weight": torch.zeros(IN, OUT)}, ["a.q.weight"])
