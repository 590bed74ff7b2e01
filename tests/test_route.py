"""Routing: RLOO unbiasedness, equal weights, save/load, Arrow prototypes, generation with the KV cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lorafuse.adapters import LoRA, LoRAModule, load_lora
from lorafuse.fusion.instance import (
    EncoderConfig,
    InstanceEncoder,
    InstanceMixing,
    mode_weights,
    read_encoder,
    train_encoder,
)
from lorafuse.route import ArrowSource, Mixture, MixtureConfig, RoutingStats, plot_health, train_mixture
from lorafuse.route.arrow import arrow_weights, bank_prototypes
from lorafuse.route.functional import (
    effective_experts,
    equal_weights,
    gumbel_topk,
    load_balance_loss,
    plackett_luce_logprob,
    rloo_advantages,
    sequence_losses,
    top_right_singular_vector,
    top_share,
)
from lorafuse.runtime import attach, detach
from lorafuse.tiny import tiny_llama
from lorafuse.train.loop import TrainConfig

torch.set_num_threads(1)


def toy_data(n: int = 48, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (10,), generator=g).tolist()
        out.append((ids, [-100] * 5 + ids[5:]))
    return out


def trained_mixture(router: str, seed: int = 0, steps: int = 8) -> tuple[torch.nn.Module, Mixture]:
    model = tiny_llama(0)
    config = MixtureConfig(router=router, experts=4, top_k=2, rank=4, alpha=8, samples=3, seed=seed)
    mixture, _ = train_mixture(
        model, toy_data(), config, TrainConfig(steps=steps, batch_size=8, lr=2e-2, seed=seed), progress=False
    )
    return model, mixture


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: bool) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        use_cache=cache,
        pad_token_id=0,
        eos_token_id=None,
    )


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(1))  # (B, T)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


# ---------------------------------------------------------------- pure maths


def test_rloo_estimator_is_unbiased_against_the_exact_gradient() -> None:
    """E[(1/M) Σ A_m ∇ log π(S_m)] = ∇ E_π[R(S)], with the exact gradient by enumeration."""
    n, k, samples, groups = 5, 2, 4, 40_000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, generator=g)
    reward_of_set = {
        frozenset(s): float(torch.randn(1, generator=g)) for s in itertools.combinations(range(n), k)
    }

    exact_logits = logits.clone().requires_grad_(True)
    orders = torch.tensor(list(itertools.permutations(range(n), k)))  # every ordered selection
    probs = plackett_luce_logprob(exact_logits.expand(len(orders), n), orders).exp()
    assert abs(float(probs.detach().sum()) - 1.0) < 1e-5  # Plackett–Luce is a distribution over orders
    rewards = torch.tensor([reward_of_set[frozenset(o.tolist())] for o in orders])
    (probs * rewards).sum().backward()
    exact = exact_logits.grad

    mc_logits = logits.clone().requires_grad_(True)
    picked = gumbel_topk(mc_logits.expand(groups, samples, n), k, g)  # (G, M, k)
    logp = plackett_luce_logprob(mc_logits.expand(groups, samples, n), picked)  # (G, M)
    table = torch.zeros(n, n)
    for s, r in reward_of_set.items():
        i, j = sorted(s)
        table[i, j] = table[j, i] = r
    r = table[picked[..., 0], picked[..., 1]]  # (G, M)
    advantages = rloo_advantages(r.transpose(0, 1)).transpose(0, 1)  # (G, M)
    ((advantages * logp).sum() / (groups * samples)).backward()
    estimate = mc_logits.grad
    assert torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact) < 0.05

    # the same samples with the sample's own reward in its baseline are biased (shrunk by (M-1)/M)
    biased = r - r.mean(1, keepdim=True)
    assert torch.allclose(advantages * (samples - 1) / samples, biased, atol=1e-6)


def test_rloo_advantages_formula() -> None:
    rewards = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.stack(
        [rewards[m] - torch.cat([rewards[:m], rewards[m + 1 :]]).mean(0) for m in range(4)]
    )
    assert torch.allclose(rloo_advantages(rewards), expected, atol=1e-6)
    with pytest.raises(ValueError):
        rloo_advantages(rewards[:1])


def test_gumbel_topk_samples_plackett_luce() -> None:
    """The sampler's frequencies of the first pick match softmax(logits)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    picks = gumbel_topk(logits.expand(50_000, 4), 2, torch.Generator().manual_seed(0))
    assert (picks[:, 0] != picks[:, 1]).all()
    freq = torch.bincount(picks[:, 0], minlength=4).float() / 50_000
    assert torch.allclose(freq, logits.softmax(0), atol=0.01)


def test_equal_weights_balance_and_health_maths() -> None:
    idx = torch.tensor([[[0, 3], [2, 1]]])  # (B, T, k)
    w = equal_weights(idx, 5)
    assert torch.equal(w.sum(-1), torch.ones(1, 2)) and set(w.unique().tolist()) == {0.0, 0.5}
    uniform = torch.full((6, 4), 0.25)
    assert torch.isclose(effective_experts(uniform[0]), torch.tensor(4.0))
    assert torch.isclose(effective_experts(torch.tensor([0.0, 1.0, 0.0])), torch.tensor(1.0))
    assert torch.isclose(top_share(torch.tensor([1.0, 3.0])), torch.tensor(0.75))
    balanced = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    assert torch.isclose(load_balance_loss(uniform, balanced), torch.tensor(1.0))
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 6)
    assert load_balance_loss(collapsed, torch.tensor([[0, 1]] * 6)) > 1.5


def test_sequence_losses_match_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :3] = -100
    per = sequence_losses(logits, labels)
    for b in range(2):
        ref = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100)
        assert torch.isclose(per[b], ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 20, 12), (1, 7, 9), (6, 10, 30)])
def test_arrow_prototype_is_the_top_right_singular_vector(shape: tuple[int, int, int]) -> None:
    r, d_in, d_out = shape
    g = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    v = top_right_singular_vector(a, b)
    dense = torch.linalg.svd((b @ a).double()).Vh[0].float()
    assert torch.isclose(v.norm(), torch.tensor(1.0), atol=1e-5)
    assert abs(float(v @ dense)) > 1 - 1e-5  # equal up to sign


def test_arrow_weights_pick_the_aligned_lora() -> None:
    protos = torch.eye(4, 8)  # (k, in)
    x = torch.zeros(1, 2, 8)
    x[0, 0, 2], x[0, 1, 0], x[0, 1, 3] = -5.0, 3.0, 2.0
    w = arrow_weights(x, protos, top_k=2)
    assert w[0, 0].argmax() == 2 and torch.isclose(w.sum(-1), torch.ones(1, 2)).all()
    assert set(w[0, 1].nonzero().flatten().tolist()) == {0, 3}


# ---------------------------------------------------------------- model plumbing


def test_remix_uses_equal_weights_at_inference_and_deterministic_topk() -> None:
    model, mixture = trained_mixture("remix")
    seen: list[torch.Tensor] = []
    mixture.source.stats = lambda layer, w, m: seen.append(w)
    ids, mask = left_padded()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, again)  # no sampling at inference
    assert len(seen) == 2 * 2  # 2 passes × 2 layers
    for w in seen:
        nonzero = w[w != 0]
        assert torch.allclose(nonzero, torch.full_like(nonzero, 0.5))
        assert ((w != 0).sum(-1) == 2).all()
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    logits = mixture.router.logits(0, x)
    expected = equal_weights(logits.topk(2, -1).indices, 4)
    from lorafuse.route.router import ROUTINGS

    assert torch.equal(ROUTINGS["remix"].route(mixture.source, 0, logits), expected)


def test_remix_trains_router_by_rloo_and_softmax_by_backprop() -> None:
    for router in ("remix", "softmax"):
        _, mixture = trained_mixture(router)
        initial = Mixture.create(
            tiny_llama(0), MixtureConfig(router=router, experts=4, top_k=2, rank=4, alpha=8)
        )
        assert not torch.allclose(mixture.router.weight, initial.router.weight)  # the router learned
        assert any(bool(b.B.abs().sum() > 0) for b in mixture.bank.banks.values())  # experts learned


@pytest.mark.parametrize("router", ["softmax", "remix"])
def test_mixture_saves_loads_and_generates_with_the_kv_cache(router: str, tmp_path: Path) -> None:
    model, mixture = trained_mixture(router, steps=10)
    ids, mask = left_padded()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    cached, uncached = greedy(model, ids, mask, True), greedy(model, ids, mask, False)
    assert torch.equal(cached, uncached)
    mixture.save(tmp_path / "mix")
    assert load_lora(tmp_path / "mix" / "experts" / "e0").modules  # each expert is a PEFT folder
    mixture.remove()
    base_tokens = greedy(model, ids, mask, True)

    fresh = tiny_llama(0)
    loaded = Mixture.load(tmp_path / "mix", fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-6)
    assert torch.equal(greedy(fresh, ids, mask, True), cached)
    assert not torch.equal(base_tokens, cached) or router == "softmax"  # the experts act
    loaded.remove()


def test_routing_health_and_plot(tmp_path: Path) -> None:
    model, mixture = trained_mixture("softmax")
    stats = RoutingStats()
    mixture.source.stats = stats
    ids, mask = left_padded()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    summary = stats.summary()
    assert len(summary["effective_experts"]) == 2
    assert all(1.0 <= e <= 4.0 + 1e-6 for e in summary["effective_experts"])
    assert all(abs(sum(u) - 1) < 1e-4 for u in summary["usage"])
    png = plot_health({"softmax": [summary["effective_experts"]]}, tmp_path / "h.png", n_experts=4)
    assert png.read_bytes()[:4] == b"\x89PNG"


def random_loras(model: torch.nn.Module, n: int) -> dict[str, LoRA]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for i in range(n):
        modules = {}
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
            lin = model.get_submodule(path)
            a = torch.randn(3, lin.in_features, generator=g) * 0.3
            modules[path] = LoRAModule(a, torch.randn(lin.out_features, 3, generator=g) * 0.3, 1.0)
        out[f"l{i}"] = LoRA(modules, name=f"l{i}")
    return out


def test_instance_encoder_is_fixed_per_sequence_saves_loads_and_generates(tmp_path: Path) -> None:
    model = tiny_llama(0)
    basis = random_loras(model, 3)
    mixing, losses = train_encoder(
        model,
        basis,
        toy_data(),
        EncoderConfig(activation="softmax", dim=8, seed=0),
        TrainConfig(steps=5, batch_size=8, lr=5e-2),
        progress=False,
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    ids, mask = left_padded()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    coeff = mixing.source.coefficients
    cached = greedy(model, ids, mask, True)
    assert torch.equal(mixing.source.coefficients, coeff)  # fixed for the sequence
    uncached = greedy(model, ids, mask, False)
    assert torch.equal(mixing.source.coefficients, coeff)  # re-fed prompt + tokens: still the prompt's
    assert torch.equal(cached, uncached)
    assert coeff is not None and coeff.shape == (3, 3) and torch.allclose(coeff.sum(-1), torch.ones(3))
    mixing.save(tmp_path / "enc", {n: f"/somewhere/{n}" for n in basis})
    mixing.remove()

    meta, encoder = read_encoder(tmp_path / "enc")
    assert list(meta["basis"]) == list(basis)
    fresh = tiny_llama(0)
    again = InstanceMixing(fresh, basis, encoder)
    assert torch.equal(greedy(fresh, ids, mask, True), cached)
    with torch.no_grad():
        fresh(input_ids=ids, attention_mask=mask)
    assert again.source.coefficients is not None
    assert torch.allclose(again.source.coefficients, coeff, atol=1e-6)
    again.remove()


def test_instance_encoder_tanh_and_topk() -> None:
    pooled = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    tanh = InstanceEncoder(16, 4, EncoderConfig(activation="tanh", dim=8))(pooled)
    assert tanh.shape == (5, 4) and (tanh.abs() < 1).all()
    sparse = InstanceEncoder(16, 4, EncoderConfig(top_k=2, dim=8))(pooled)
    assert ((sparse > 0).sum(-1) == 2).all() and torch.allclose(sparse.sum(-1), torch.ones(5))


def test_arrow_source_generates_with_the_kv_cache_and_prototypes_match_dense() -> None:
    model = tiny_llama(0)
    basis = random_loras(model, 3)
    handle = attach(model, basis)
    bank = handle.banks["model.layers.0.self_attn.q_proj"]
    protos = bank_prototypes(bank)
    for i, lora in enumerate(basis.values()):
        dense = torch.linalg.svd(lora.modules[bank.path].delta().double()).Vh[0].float()
        assert abs(float(protos[i] @ dense)) > 1 - 1e-5
    source = ArrowSource(handle, model, top_k=2)
    handle.set_source(source)
    ids, mask = left_padded()
    assert torch.equal(greedy(model, ids, mask, True), greedy(model, ids, mask, False))
    source.remove()
    detach(model)


def test_mode_switch_is_a_fixed_weight_row() -> None:
    names = ["math", "zorb", "list"]
    modes = {"maths": ["math"], "foreign_maths": ["math", "zorb"]}
    assert mode_weights(names, modes, "foreign_maths").tolist() == [1.0, 1.0, 0.0]
    assert mode_weights(names, modes, ["maths", "foreign_maths"]).shape == (2, 3)
    with pytest.raises(Exception, match="unknown mode"):
        mode_weights(names, modes, "speech")


def test_cli_route_train_generate_and_study(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorafuse.cli import app
    from lorafuse.skillworld import build_world

    world = build_world(tmp_path / "world", profile="tiny", seed=0, progress=False)
    runner = CliRunner()
    common = ["--base", str(world / "base"), "--tokenizer", str(world / "tokenizer")]
    data = ["--data", str(world / "data" / "math" / "train.jsonl")]
    out = tmp_path / "mix"
    args = ["route", "train", "--router", "remix", "--experts", "3", "--rank", "2", "--samples", "2"]
    result = runner.invoke(
        app, [*args, "--steps", "2", "--batch-size", "4", "--out", str(out), *common, *data]
    )
    assert result.exit_code == 0, result.output
    assert (out / "mixture.json").is_file() and (out / "experts" / "e2").is_dir()
    result = runner.invoke(
        app, ["route", "generate", "--mixture", str(out), "-p", "copy : red dog .", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "copy : red dog . →" in result.output
    modes = tmp_path / "modes.json"
    modes.write_text('{"maths": ["math"]}')
    loras = ["--lora", str(world / "loras" / "math"), "--lora", str(world / "loras" / "copy")]
    for how in (["--arrow", "--top-k", "1"], ["--mode", "maths", "--modes", str(modes)]):
        result = runner.invoke(app, ["route", "generate", *how, *loras, *common, "-p", "copy : red ."])
        assert result.exit_code == 0, result.output
    study = tmp_path / "study.json"
    small = ["--methods", "arrow", "--limit", "1", "--threads", "1"]
    outputs = ["--json", str(study), "--png", str(tmp_path / "h.png")]
    result = runner.invoke(app, ["world", "route-study", "--dir", str(world), *small, *outputs])
    assert result.exit_code == 0, result.output
    runs = json.loads(study.read_text())["runs"]
    assert [r["method"] for r in runs] == ["arrow"]  # the trained methods: test_route_study_runs_each_method
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
