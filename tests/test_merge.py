"""Merge methods: exact maths on random factors, PEFT/dense references, invariants, CLI, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from typer.testing import CliRunner

from conftest import load
from lorafuse import LoRA, LoRAModule, load_lora, save_lora
from lorafuse.cli import app
from lorafuse.merging import MERGE_METHODS, RecipeError, load_recipe, merge
from lorafuse.merging.factored import randomized_svd, truncate_factors

OUT, IN = 24, 20
SPARSE = ("ties", "dare-linear", "dare-ties", "magnitude-prune")


def random_lora(
    seed: int, rank: int, paths: tuple[str, ...] = ("m.0.q", "m.1.q"), base: str | None = None
) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    modules = {
        p: LoRAModule(
            torch.randn(rank, IN, generator=g),
            torch.randn(OUT, rank, generator=g),
            0.25 + seed / 10,
        )
        for p in paths
    }
    return LoRA(modules, base_model=base, name=f"l{seed}")


LORAS = [random_lora(1, 4), random_lora(2, 6), random_lora(3, 2)]
WEIGHTS = [0.8, -0.5, 1.7]


def exact_sum(loras: list[LoRA], weights: list[float], path: str = "m.0.q") -> torch.Tensor:
    return sum(w * lo[path].delta() for lo, w in zip(loras, weights, strict=True))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_are_exact_with_negative_weights(method: str) -> None:
    merged = merge(LORAS, method, WEIGHTS, progress=False)
    for path in ("m.0.q", "m.1.q"):
        assert rel_err(merged[path].delta(), exact_sum(LORAS, WEIGHTS, path)) < 1e-5
    assert merged["m.0.q"].rank == 12


def test_svd_full_rank_exact_and_truncation_optimal() -> None:
    want = exact_sum(LORAS, WEIGHTS)
    assert rel_err(merge(LORAS, "svd", WEIGHTS, rank=12, progress=False)["m.0.q"].delta(), want) < 1e-5
    sigma = torch.linalg.svdvals(want.double())
    for k in (1, 3, 6):
        merged = merge(LORAS, "svd", WEIGHTS, rank=k, progress=False)["m.0.q"]
        assert merged.rank == k
        error = (merged.delta().double() - want.double()).norm().item()
        assert error == pytest.approx(sigma[k:].square().sum().sqrt().item(), rel=1e-4)  # Eckart–Young


def test_factored_truncation_never_forms_dense() -> None:
    b, a = torch.randn(5000, 8), torch.randn(8, 4000)
    tb, ta = truncate_factors(b, a, 8)
    assert tb.shape == (5000, 8) and ta.shape == (8, 4000)
    probe = torch.randn(4000, 3)
    torch.testing.assert_close(tb @ (ta @ probe), b @ (a @ probe), rtol=1e-3, atol=1e-2)


def test_randomized_svd_matches_exact_on_low_rank_plus_noise() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g) + 1e-3 * torch.randn(
        300, 200, generator=g
    )
    _, s, _ = randomized_svd(m, 6, generator=g)
    torch.testing.assert_close(s, torch.linalg.svdvals(m)[:6], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ties", "magnitude-prune"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_sparse_methods_equal_peft_dense_reference(method: str, sign_method: str) -> None:
    loras = [random_lora(1, 4), random_lora(2, 6)]
    weights = [0.7, 1.3]
    merged = merge(
        loras,
        method,
        weights,
        rank=min(OUT, IN),
        density=0.4,
        majority_sign_method=sign_method,
        progress=False,
    )
    taus = [lo["m.0.q"].delta() for lo in loras]
    if method == "ties":
        want = merge_utils.ties(taus, torch.tensor(weights), 0.4, sign_method)
    else:
        want = merge_utils.magnitude_prune(taus, torch.tensor(weights), 0.4)
    assert rel_err(merged["m.0.q"].delta(), want) < 1e-4


def test_dare_is_unbiased_and_keeps_density() -> None:
    loras = [random_lora(1, 4), random_lora(2, 6)]
    want = exact_sum(loras, [1.0, 0.5])
    runs = [
        merge(loras, "dare-linear", [1.0, 0.5], rank=20, density=0.3, seed=s, progress=False)["m.0.q"].delta()
        for s in range(300)
    ]
    # per entry the std of one run is |τ|·√((1−p)/p) ≈ 1.53|τ|: ≈ 0.09 relative after 300 runs;
    # without the 1/p rescale the mean would be 0.3 × want (relative error 0.7)
    assert rel_err(torch.stack(runs).mean(0), want) < 0.15
    assert rel_err(runs[0], want) > 0.5  # a single run is far from the mean: the mask is real
    kept = torch.stack([(r.abs() > 1e-4).float().mean() for r in runs]).mean().item()
    assert kept == pytest.approx(1 - 0.7**2, abs=0.02)  # union of two Bernoulli(0.3) masks
    assert not torch.equal(runs[0], runs[1])
    again = merge(loras, "dare-linear", [1.0, 0.5], rank=20, density=0.3, seed=0, progress=False)
    assert torch.equal(
        again["m.0.q"].A,
        merge(loras, "dare-linear", [1.0, 0.5], rank=20, density=0.3, seed=0, progress=False)["m.0.q"].A,
    )


def test_dare_ties_at_density_one_is_ties() -> None:
    a = merge(LORAS, "dare-ties", WEIGHTS, rank=20, density=1.0, progress=False)["m.0.q"].delta()
    b = merge(LORAS, "ties", WEIGHTS, rank=20, density=1.0, progress=False)["m.0.q"].delta()
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "lego", *SPARSE])
def test_merge_of_one_is_identity(method: str) -> None:
    one = random_lora(4, 5)
    params = {"density": 1.0} if method in SPARSE else {}
    merged = merge([one], method, progress=False, **params)
    for path in one:
        assert rel_err(merged[path].delta(), one[path].delta()) < 1e-4, method


def test_lego_invariant_to_rank_permutation_and_mixes_ranks() -> None:
    merged = merge(LORAS, "lego", rank=5, progress=False)
    assert merged["m.0.q"].rank == 5
    permuted = []
    for i, lo in enumerate(LORAS):
        perm = torch.randperm(lo["m.0.q"].rank, generator=torch.Generator().manual_seed(i))
        permuted.append(
            LoRA(
                {p: LoRAModule(m.A[perm], m.B[:, perm], m.scale) for p, m in lo.modules.items()},
                name=lo.name,
            )
        )
    again = merge(permuted, "lego", rank=5, progress=False)
    torch.testing.assert_close(again["m.0.q"].delta(), merged["m.0.q"].delta(), rtol=1e-5, atol=1e-5)


def test_lego_reweighting_settings() -> None:
    plain = merge(
        LORAS, "lego", rank=4, parameter_reweighting=False, output_reweighting=False, progress=False
    )
    full = merge(LORAS, "lego", rank=4, progress=False)
    assert not torch.allclose(plain["m.0.q"].delta(), full["m.0.q"].delta())
    # parameter reweighting: every centroid row has the mean norm of its members (finite, non-zero)
    assert torch.all(full["m.0.q"].A.norm(dim=1) > 0)


def test_incompatible_inputs_are_refused() -> None:
    other = random_lora(5, 4, paths=("m.0.q",))
    with pytest.raises(ValueError, match=r"adapt different modules:\n  l5 lacks m.1.q"):
        merge([LORAS[0], other], "cat", progress=False)
    union = merge([LORAS[0], other], "cat", union=True, progress=False)
    assert union["m.1.q"].rank == 4 and union["m.0.q"].rank == 8
    wrong = LoRA(
        {
            "m.0.q": LoRAModule(torch.randn(2, IN + 1), torch.randn(OUT, 2), 1.0),
            "m.1.q": LORAS[0]["m.1.q"],
        },
        name="w",
    )
    with pytest.raises(
        ValueError,
        match=r"m.0.q: the LoRAs disagree on the layer shape \(out, in\): l1: \(24, 20\), w: \(24, 21\)",
    ):
        merge([LORAS[0], wrong], "svd", progress=False)
    with pytest.raises(ValueError, match="different base models"):
        merge(
            [random_lora(1, 2, base="llama-7b"), random_lora(2, 2, base="qwen-7b")],
            "cat",
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        merge(LORAS, "slerp", progress=False)
    with pytest.raises(ValueError, match="density"):
        merge(LORAS, "ties", density=1.5, progress=False)
    with pytest.raises(ValueError, match="got 2 weights for 3 LoRAs"):
        merge(LORAS, "cat", [1.0, 2.0], progress=False)


def test_registry_lists_every_method() -> None:
    assert set(MERGE_METHODS) == {"cat", "linear", "svd", "lego", *SPARSE}
    assert {n for n, m in MERGE_METHODS.items() if m.exact} == {"cat", "linear"}


@torch.no_grad()
def test_cat_merge_saved_loads_in_peft_like_peft_cat(
    llama_dir: Path, llama_adapters: dict[str, Path], ids: torch.Tensor, tmp_path: Path
) -> None:
    names = ["plain", "patterned"]
    loras = [load_lora(llama_adapters[n]) for n in names]
    weights = [0.6, -1.1]
    saved = save_lora(merge(loras, "cat", weights, union=True, progress=False), tmp_path / "cat")
    ours = PeftModel.from_pretrained(load(llama_dir), saved).eval()(ids).logits
    peft = PeftModel.from_pretrained(load(llama_dir), llama_adapters["plain"], adapter_name="plain")
    peft.load_adapter(llama_adapters["patterned"], adapter_name="patterned")
    peft.add_weighted_adapter(names, weights, "m", combination_type="cat")
    peft.set_adapter("m")
    assert (ours - peft.eval()(ids).logits).abs().max().item() <= 1e-5
    recipe = json.loads((saved / "lorafuse.json").read_text())["recipe"]
    assert recipe["merge_method"] == "cat" and [m["weight"] for m in recipe["models"]] == weights


def test_cli_merge_and_recipe(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    a, b = str(llama_adapters["plain"]), str(llama_adapters["patterned"])
    result = runner.invoke(
        app,
        [
            "merge",
            "-m",
            "ties",
            "--density",
            "0.5",
            "--rank",
            "4",
            "--weights",
            "1,0.5",
            "-o",
            str(tmp_path / "t"),
            a,
            b,
        ],
    )
    assert result.exit_code == 0, result.output
    merged = load_lora(tmp_path / "t")
    assert set(merged.ranks.values()) == {4} and len(merged) == 14
    again = runner.invoke(app, ["merge", "-m", "ties", "-o", str(tmp_path / "t"), a, b])
    assert again.exit_code != 0 and "exists" in again.output

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: svd\nmodels:\n  - adapter: {a}\n    weight: 1.0\n  - adapter: {b}\n    weight: -0.5\n"
        f"rank: 3\nout: {tmp_path / 'from_recipe'}\n"
    )
    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 0, result.output
    assert set(load_lora(tmp_path / "from_recipe").ranks.values()) == {3}

    bad = runner.invoke(
        app, ["merge", "-m", "cat", "-o", str(tmp_path / "u"), a, str(llama_adapters["rslora_qv"])]
    )
    assert bad.exit_code == 2 and "--union" in bad.output


def test_recipe_validation(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: ties\nmodels: [{adapter: a}]\nparameters: {density: 2}\n")
    with pytest.raises(RecipeError, match="density"):
        load_recipe(path)
    path.write_text("merge_method: ties\nmodels: [{adapter: a, wieght: 1}]\n")
    with pytest.raises(RecipeError, match="wieght"):
        load_recipe(path)
    path.write_text("merge_method: cat\nmodels: [{adapter: sub/a, weight: 2}]\n")
    assert load_recipe(path).models[0].adapter == str((tmp_path / "sub" / "a").resolve())


def test_package_level_api() -> None:
    import lorafuse
    import lorafuse.merging.ties as ties_module

    merged = lorafuse.merge(LORAS, "cat", WEIGHTS, progress=False)
    assert rel_err(merged["m.0.q"].delta(), exact_sum(LORAS, WEIGHTS)) < 1e-5
    assert ties_module.SparsifyParams().density == 0.5
