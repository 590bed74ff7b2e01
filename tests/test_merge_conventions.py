"""TIES / DARE-TIES in both conventions: element-by-element dense references, PEFT's own functions."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft.utils import merge_utils
from torch import Tensor

from lorafuse import LoRA, LoRAModule
from lorafuse.merging import merge
from lorafuse.merging.api import module_generator
from lorafuse.merging.functional import elect_and_merge, sparsify

OUT, IN = 12, 10
WEIGHT_SETS = [(1.0, 1.0), (0.7, 0.3), (0.8, -0.5, 1.7)]


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude, by sorting a Python list."""
    flat = [float(v) for v in tau.flatten()]
    keep = set(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[: int(density * len(flat))])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)], dtype=torch.float64).view(
        tau.shape
    )


def reference_disjoint(
    taus: list[Tensor], weights: tuple[float, ...], convention: str, sign_method: str
) -> Tensor:
    """The elect-and-merge step, one entry at a time, written from the two peers' descriptions.

    peft: vote on the unweighted deltas, divide by the number of agreeing deltas (at least 1);
    mergekit: vote on the weighted deltas, divide by the sum of agreeing weights (0 counts as 1).
    """
    out = torch.zeros(taus[0].shape, dtype=torch.float64)
    for row, col in itertools.product(range(taus[0].shape[0]), range(taus[0].shape[1])):
        values = [float(t[row, col]) for t in taus]
        weighted = [w * v for w, v in zip(weights, values, strict=True)]
        voters = values if convention == "peft" else weighted
        strength = sum(voters) if sign_method == "total" else sum(sign(v) for v in voters)
        elected = 1 if strength >= 0 else -1
        agreeing = [i for i, v in enumerate(voters) if sign(v) == elected]
        total = sum(weighted[i] for i in agreeing)
        count, weight_sum = max(1, len(agreeing)), sum(weights[i] for i in agreeing) or 1.0
        out[row, col] = total / (count if convention == "peft" else weight_sum)
    return out


def random_loras(n: int, seed: int = 0) -> list[LoRA]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoRA(
            {
                "m.q": LoRAModule(
                    torch.randn(3 + i, IN, generator=g), torch.randn(OUT, 3 + i, generator=g), 0.5
                )
            },
            name=f"l{i}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_elect_and_merge_equals_elementwise_reference(
    convention: str, sign_method: str, weights: tuple[float, ...]
) -> None:
    g = torch.Generator().manual_seed(len(weights))
    taus = [reference_trim(torch.randn(OUT, IN, generator=g), 0.6) for _ in weights]
    got = elect_and_merge(
        torch.stack(taus).float(),
        torch.tensor(weights),
        True,
        sign_method,
        convention,  # type: ignore[arg-type]
    )
    want = reference_disjoint(taus, weights, convention, sign_method)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_ties_merge_equals_dense_reference(convention: str, weights: tuple[float, ...]) -> None:
    loras = random_loras(len(weights))
    merged = merge(
        loras, "ties", list(weights), rank=min(OUT, IN), density=0.4, convention=convention, progress=False
    )
    taus = [reference_trim(lo["m.q"].delta().double(), 0.4) for lo in loras]
    want = reference_disjoint(taus, weights, convention, "total")
    torch.testing.assert_close(merged["m.q"].delta().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
def test_dare_ties_merge_equals_dense_reference_with_its_masks(convention: str) -> None:
    loras, weights, density = random_loras(2, seed=3), (0.7, 0.3), 0.5
    merged = merge(
        loras,
        "dare-ties",
        list(weights),
        rank=min(OUT, IN),
        density=density,
        seed=5,
        convention=convention,
        progress=False,
    )
    generator = module_generator(5, "m.q")  # the masks merge drew, in the same order
    dropped = [sparsify(lo["m.q"].delta(), density, "random", generator).double() for lo in loras]
    kept = [(d != 0).double().mean().item() for d in dropped]
    assert all(0.3 < k < 0.7 for k in kept)  # a real Bernoulli(0.5) drop
    for d, lo in zip(dropped, loras, strict=True):  # rescaled by 1/p where kept
        torch.testing.assert_close(d[d != 0], (lo["m.q"].delta().double() / density)[d != 0])
    want = reference_disjoint(dropped, weights, convention, "total")
    torch.testing.assert_close(merged["m.q"].delta().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_peft_convention_equals_peft_ties(sign_method: str, weights: tuple[float, ...]) -> None:
    loras = random_loras(len(weights), seed=1)
    merged = merge(
        loras,
        "ties",
        list(weights),
        rank=min(OUT, IN),
        density=0.4,
        majority_sign_method=sign_method,
        convention="peft",
        progress=False,
    )
    want = merge_utils.ties([lo["m.q"].delta() for lo in loras], torch.tensor(weights), 0.4, sign_method)
    torch.testing.assert_close(merged["m.q"].delta(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_peft_convention_equals_peft_dare_ties_on_the_same_mask(sign_method: str) -> None:
    """PEFT draws its DARE masks from the global generator; the same draw feeds both."""
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(OUT, IN, generator=g) for _ in range(3)]
    weights, density = torch.tensor([0.8, -0.5, 1.7]), 0.5
    torch.manual_seed(11)
    want = merge_utils.dare_ties(taus, weights, density, sign_method)
    torch.manual_seed(11)
    dropped = [t * torch.bernoulli(torch.full_like(t, density)) / density for t in taus]
    got = elect_and_merge(torch.stack(dropped), weights, True, sign_method, "peft")  # type: ignore[arg-type]
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["ties", "dare-ties"])
def test_conventions_agree_at_unit_weights_and_differ_otherwise(method: str) -> None:
    loras = random_loras(2, seed=2)

    def run(weights: list[float], convention: str) -> Tensor:
        return merge(
            loras, method, weights, rank=min(OUT, IN), density=0.5, convention=convention, progress=False
        )["m.q"].delta()

    assert torch.equal(run([1.0, 1.0], "peft"), run([1.0, 1.0], "mergekit"))
    assert (run([0.7, 0.3], "peft") - run([0.7, 0.3], "mergekit")).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["dare-linear", "magnitude-prune"])
def test_weighted_sum_methods_are_the_same_in_both_conventions(method: str) -> None:
    loras = random_loras(2, seed=4)
    peft, mergekit = (
        merge(loras, method, [0.7, 0.3], density=0.5, convention=c, progress=False)["m.q"].delta()
        for c in ("peft", "mergekit")
    )
    assert torch.equal(peft, mergekit)


def test_peft_is_the_default_convention_and_recorded() -> None:
    loras = random_loras(2, seed=6)
    default = merge(loras, "ties", [0.7, 0.3], density=0.5, progress=False)
    explicit = merge(loras, "ties", [0.7, 0.3], density=0.5, convention="peft", progress=False)
    assert torch.equal(default["m.q"].delta(), explicit["m.q"].delta())
    assert default.metadata["lorafuse"]["recipe"]["parameters"]["convention"] == "peft"
    with pytest.raises(ValueError, match="convention"):
        merge(loras, "ties", convention="average", progress=False)
