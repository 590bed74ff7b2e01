"""Delta compression: packing, byte accounting, GPTQ vs RTN, Delta-CoMe, runtime = decompress, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import load
from lorafuse import attach
from lorafuse.cli import app
from lorafuse.compress import (
    COMPRESS_METHODS,
    apply_delta,
    collect_hessians,
    compress_checkpoint,
    decompress,
    distill_scales,
    gptq_quantize,
    load_compressed,
    pack_bits,
    packed_nbytes,
    parse_budget,
    rtn_quantize,
    unpack_bits,
)
from lorafuse.compress.budget import factors_nbytes
from lorafuse.compress.deltacome import DeltaCoMeParams, compress_delta_come
from lorafuse.compress.types import SignDelta
from lorafuse.errors import BudgetError, CompressError
from lorafuse.skillworld.tokenizer import build_tokenizer
from lorafuse.tiny import save_model, tiny_gpt2, tiny_llama


def long_tailed(out: int, in_: int, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """A delta with singular values ``i^-decay`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, min(out, in_), generator=g))
    V, _ = torch.linalg.qr(torch.randn(in_, min(out, in_), generator=g))
    s = torch.arange(1, min(out, in_) + 1, dtype=torch.float32) ** -decay
    return 0.01 * (U * s) @ V.T  # (out, in)


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim // 4, generator=g) @ torch.randn(
        dim // 4, dim, generator=g
    ) + 0.1 * torch.randn(n, dim, generator=g)  # (n, in)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_bit_exactly(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 1000, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g).to(torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, n), codes)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1 << bits]), bits)


def test_quantized_matrix_round_trips_and_dequantizes_on_the_grid() -> None:
    W = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    for bits in (2, 5, 8):
        q = rtn_quantize(W, bits, 128)
        restored = type(q).from_tensors(q.to_tensors("m"), "m", q.meta())
        assert torch.equal(restored.dequantize(), q.dequantize())
        assert sum(t.nbytes for t in q.to_tensors("m").values()) == q.nbytes
        assert q.dequantize().sub(W).abs().max() <= q.scales.float().max() / 2 + 1e-6  # half a step


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_layer_output_error_below_rtn(bits: int) -> None:
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))  # (out, in)
    X = correlated_inputs(2048, 256)
    H = X.T @ X / len(X)
    ref = W @ X.T

    def err(Wq: torch.Tensor) -> float:
        return float((Wq @ X.T - ref).norm() / ref.norm())

    rtn = err(rtn_quantize(W, bits, 128).dequantize())
    gptq = err(gptq_quantize(W, H, bits, group_size=128).dequantize())
    assert gptq < 0.6 * rtn, (bits, gptq, rtn)


def test_delta_come_full_rank_8_bits_nearly_reconstructs() -> None:
    delta = long_tailed(48, 40)
    X = correlated_inputs(512, 40)
    params = DeltaCoMeParams(schedule="8:*")
    module = compress_delta_come(delta, X.T @ X / len(X), 10**9, params, "m")
    assert module.segments == [(40, 8)]
    assert float((module.delta() - delta).norm() / delta.norm()) < 0.02


def test_delta_come_budget_and_schedules() -> None:
    delta = long_tailed(256, 128)
    budget = 256 * 128 * 2 // 16
    paper = compress_delta_come(delta, None, budget, DeltaCoMeParams(schedule="paper"), "m")
    assert paper.segments[0] == (2, 8) and paper.segments[1][1] == 3
    assert paper.nbytes == factors_nbytes(256, 128, paper.segments) <= budget
    auto = compress_delta_come(delta, None, budget, DeltaCoMeParams(schedule="auto"), "m")
    assert auto.nbytes <= budget and auto.estimated_error is not None
    custom = compress_delta_come(delta, None, budget, DeltaCoMeParams(schedule="4:3,2:*"), "m")
    assert custom.segments[0] == (3, 4) and all(b == 2 for _, b in custom.segments[1:])
    with pytest.raises(BudgetError, match="cannot hold even one singular vector"):
        compress_delta_come(delta, None, 100, DeltaCoMeParams(), "model.layers.0.mlp.up_proj")


def test_bitdelta_scale_is_l2_optimal() -> None:
    delta = long_tailed(64, 64)
    method = COMPRESS_METHODS["bitdelta"]
    module = method.fn(delta, None, 64 * 64 // 8, method.params(), "m")
    best = float((module.delta() - delta).norm())
    for factor in (0.95, 1.05):
        assert best < float((module.delta() * factor - delta).norm())


@pytest.mark.parametrize("method", ["delta-come", "low-rank", "bitdelta", "rtn"])
def test_packed_modules_hold_what_is_written_and_rebuild_exactly(method: str) -> None:
    from lorafuse.compress.format import PackedModules

    delta = long_tailed(96, 64)
    spec = COMPRESS_METHODS[method]
    X = correlated_inputs(200, 64)  # (n, in)
    module = spec.fn(delta, X.T @ X / len(X), 96 * 64 * 2 // 16, spec.params(), "m")
    packed = PackedModules()
    packed.add("m", module)
    held = sum(t.nbytes for t in packed.packed("m").tensors.values())
    assert held == module.nbytes == packed.packed("m").nbytes  # no unpacked codes kept
    rebuilt = packed["m"]
    assert type(rebuilt) is type(module) and torch.equal(rebuilt.delta(), module.delta())


def test_parse_budget() -> None:
    assert parse_budget("1/16") == 1 / 16 and parse_budget("0.05") == 0.05 and parse_budget(0.5) == 0.5
    for bad in ("abc", "0", "2", "1/0"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama and a 'fine-tune' of it: a long-tailed delta on every linear layer, noise elsewhere."""
    root = tmp_path_factory.mktemp("pair")
    base = save_model(tiny_llama(0), root / "base")
    ft = tiny_llama(0)
    with torch.no_grad():
        for i, (name, p) in enumerate(ft.named_parameters()):
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(long_tailed(*p.shape, seed=i, decay=0.7) * 5)
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return base, save_model(ft, root / "ft")


def calibration(ft_dir: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return collect_hessians(
        load(ft_dir), [torch.randint(3, 128, (16,), generator=g) for _ in range(6)], progress=False
    )


def data_bytes(path: Path) -> int:
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("method", sorted(COMPRESS_METHODS))
def test_byte_accounting_equals_file_sizes(method: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    hessians = calibration(ft) if method == "delta-come" else None
    cd = compress_checkpoint(
        base, ft, tmp_path / "c", method=method, budget="1/8", hessians=hessians, progress=False
    )
    meta = json.loads((tmp_path / "c" / "compressed.json").read_text())
    assert data_bytes(tmp_path / "c" / "delta.safetensors") == cd.nbytes == meta["nbytes"]
    assert cd.nbytes == sum(m["nbytes"] for m in meta["modules"].values())
    assert len(cd.modules) == 14  # 2 layers × 7 projections
    again = load_compressed(tmp_path / "c")
    for path, module in cd.modules.items():
        assert torch.equal(again.modules[path].delta(), module.delta())
    if method in ("delta-come", "low-rank"):  # these fit the budget exactly, scales included
        assert all(m["nbytes"] <= m["budget_nbytes"] for m in cd.info["modules"].values())


@pytest.mark.parametrize("method", ["delta-come", "low-rank", "bitdelta"])
def test_runtime_output_equals_decompress_then_run(
    method: str, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, ft = pair
    cd = compress_checkpoint(
        base, ft, tmp_path / "c", method=method, budget="1/4", hessians=calibration(ft), progress=False
    )
    decompress(tmp_path / "c", base, tmp_path / "model", progress=False)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = load(tmp_path / "model")(ids).logits
    model = load(base)
    if method == "bitdelta":  # dense: no factors; served by adding ΔŴ to the weights
        with pytest.raises(CompressError, match="dense"):
            cd.to_lora()
        apply_delta(model, cd)
    else:
        attach(model, [load_compressed(tmp_path / "c").to_lora()])  # factored, ΔW never formed
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, load(base)(ids).logits)  # the delta does something


def test_other_tensors_reported_and_stored_on_request(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    kept = compress_checkpoint(base, ft, method="low-rank", budget="1/2", progress=False)
    changed = kept.info["changed_other_tensors"]
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed and not kept.other
    stored = compress_checkpoint(
        base, ft, tmp_path / "c", method="low-rank", budget="1/2", keep_other="delta", progress=False
    )
    decompress(tmp_path / "c", base, tmp_path / "m", progress=False)
    torch.testing.assert_close(
        load(tmp_path / "m").model.embed_tokens.weight, load(ft).model.embed_tokens.weight, atol=1e-6, rtol=0
    )
    assert set(stored.other) == set(changed)


def test_bitdelta_scale_distillation_recovers_the_scales(llama_dir: Path, tmp_path: Path) -> None:
    # A fine-tune that is exactly α·sign on every projection (α = 0.03); start distillation from α/4.
    ft = load(llama_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.03 * torch.randn(p.shape, generator=g).sign())
    save_model(ft, tmp_path / "ft")
    cd = compress_checkpoint(llama_dir, tmp_path / "ft", method="bitdelta", budget="1/4", progress=False)
    assert all(abs(m.alpha - 0.03) < 1e-6 for m in cd.modules.values())
    shrunk = dataclasses.replace(
        cd, modules={p: SignDelta(m.signs, m.alpha / 4) for p, m in cd.modules.items()}
    )
    student = load(llama_dir)
    before = {n: p.clone() for n, p in student.state_dict().items()}
    seqs = [torch.randint(3, 128, (12,), generator=g) for _ in range(8)]
    tuned = distill_scales(student, ft, shrunk, seqs, steps=60, lr=2e-3, progress=False)
    record = tuned.info["scale_distillation"]
    assert record["logit_mse_after"] < 0.2 * record["logit_mse_before"]
    assert all(m.alpha > 0.02 for m in tuned.modules.values())  # from 0.0075 towards 0.03
    assert all(torch.equal(before[n], p) for n, p in student.state_dict().items())  # student untouched


def test_bad_inputs_clear_errors_and_no_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    gpt2 = save_model(tiny_gpt2(0), tmp_path / "gpt2")
    wide = save_model(tiny_llama(0, intermediate_size=48), tmp_path / "wide")
    out = tmp_path / "out"
    with pytest.raises(CompressError, match="architectures differ"):
        compress_checkpoint(base, gpt2, out, progress=False)
    with pytest.raises(CompressError, match=r"mlp\.up_proj\.weight: base \(64, 32\).*\(48, 32\)"):
        compress_checkpoint(base, wide, out, progress=False)
    sharded = tmp_path / "sharded"
    tiny_llama(0).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (sharded / lost).unlink()
    with pytest.raises(CompressError, match=f"missing: {lost}"):
        compress_checkpoint(base, sharded, out, progress=False)
    with pytest.raises(BudgetError, match="cannot hold even one singular vector"):
        compress_checkpoint(base, ft, out, budget="1/1000", progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_sharded_checkpoints_stream(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    load(ft).save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    assert (tmp_path / "ft" / "model.safetensors.index.json").exists()
    a = compress_checkpoint(base, tmp_path / "ft", method="low-rank", budget="1/4", progress=False)
    b = compress_checkpoint(base, ft, method="low-rank", budget="1/4", progress=False)
    assert all(torch.equal(a.modules[p].delta(), b.modules[p].delta()) for p in b.modules)


def test_collect_hessians_matches_inputs() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 3))

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids)

    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    H = collect_hessians(Wrap(), seqs, progress=False)["net.1"]
    X = model[0](torch.tensor([1, 2, 3, 4, 5])).detach()
    torch.testing.assert_close(H, X.T @ X / 5)


def test_cli_compress_decompress(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    lines = [" ".join(f"w{(i * 7) % 40}" for i in range(k, k + 12)) for k in range(8)]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    build_tokenizer(lines).save_pretrained(str(tmp_path / "tok"))
    calib = tmp_path / "calib.txt"
    runner = CliRunner()
    bad = runner.invoke(app, ["compress", "--base", str(base), "--finetuned", str(ft), "--budget", "1/5000",
                              "--out", str(tmp_path / "c")])  # fmt: skip
    assert isinstance(bad.exception, BudgetError) and "raise --budget" in str(
        bad.exception
    )  # main(): status 2
    assert not (tmp_path / "c").exists()
    args = [
        "compress",
        "--base",
        str(base),
        "--finetuned",
        str(ft),
        "--method",
        "delta-come",
        "--budget",
        "1/4",
    ]
    args += ["--calib", str(calib), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "c")]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "activation error" in done.output
    done = runner.invoke(
        app, ["decompress", str(tmp_path / "c"), "--base", str(base), "--out", str(tmp_path / "m")]
    )
    assert done.exit_code == 0, done.output
    assert load(tmp_path / "m").model.layers[0].self_attn.q_proj.weight.shape == (32, 32)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_layer_by_layer_hessians_equal_the_whole_model_ones(kind: str, tmp_path: Path) -> None:
    from lorafuse.compress.sequential import iter_layer_hessians
    from lorafuse.tiny import tiny_causal_lm

    model = tiny_causal_lm(kind, 0).eval()
    folder = save_model(model, tmp_path / kind)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 128, (n,), generator=g) for n in (5, 9, 13)]  # unequal lengths
    whole = collect_hessians(model, sequences, progress=False)
    layers = list(iter_layer_hessians(folder, sequences, progress=False))
    assert [index for index, _ in layers] == [0, 1]
    got = {path: h for _, hs in layers for path, h in hs.items()}
    assert set(got) == set(whole) - {"lm_head"}  # every projection of every decoder layer
    for path, h in got.items():
        torch.testing.assert_close(h, whole[path], rtol=1e-5, atol=1e-6)
    # q/k/v read one input and share one Hessian (one accumulator, one tensor)
    shared = layers[0][1]
    prefix = "model.layers.0"
    assert shared[f"{prefix}.self_attn.q_proj"] is shared[f"{prefix}.self_attn.v_proj"]
    assert shared[f"{prefix}.mlp.gate_proj"] is shared[f"{prefix}.mlp.up_proj"]
    assert shared[f"{prefix}.self_attn.q_proj"] is not shared[f"{prefix}.mlp.up_proj"]


def test_layer_by_layer_compression_equals_compression_with_whole_model_hessians(
    pair: tuple[Path, Path],
) -> None:
    base, ft = pair
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 128, (16,), generator=g) for _ in range(6)]
    hessians = collect_hessians(load(ft), sequences, progress=False)
    whole = compress_checkpoint(base, ft, hessians=hessians, budget="1/4", progress=False)
    layered = compress_checkpoint(base, ft, calibration=sequences, budget="1/4", progress=False)
    assert set(layered.modules) == set(whole.modules)
    assert layered.info["calibration"] == "layer by layer"
    for path, module in layered.modules.items():
        torch.testing.assert_close(module.delta(), whole.modules[path].delta(), rtol=1e-4, atol=1e-5)
        assert layered.info["modules"][path]["activation_error"] == pytest.approx(
            whole.info["modules"][path]["activation_error"], rel=1e-3
        )
    with pytest.raises(CompressError, match="not both"):
        compress_checkpoint(base, ft, hessians=hessians, calibration=sequences, progress=False)


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (96, 96)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_best_schedule_never_loses_to_its_candidates_at_equal_bytes(
    shape: tuple[int, int], calibrated: bool
) -> None:
    from lorafuse.compress.deltacome import output_error
    from lorafuse.compress.lowrank import compress_low_rank

    out, in_ = shape
    budget = out * in_ * 2 // 16
    H = None
    if calibrated:
        X = correlated_inputs(512, in_)
        H = X.T @ X / len(X)
    for decay in (0.3, 1.0):  # long-tailed and fast-decaying spectra
        delta = long_tailed(out, in_, seed=out + in_, decay=decay)
        best = compress_delta_come(delta, H, budget, DeltaCoMeParams(), "m")
        assert best.nbytes <= budget and best.label in ("paper", "auto", "low-rank")
        rivals = [
            compress_delta_come(delta, H, budget, DeltaCoMeParams(schedule="paper"), "m"),
            compress_delta_come(delta, H, budget, DeltaCoMeParams(schedule="auto"), "m"),
            compress_low_rank(delta, H, budget, None, "m"),  # type: ignore[arg-type]
        ]
        best_error = output_error(best.delta(), delta, H)
        for rival in rivals:
            assert rival.nbytes <= budget
            assert best_error <= output_error(rival.delta(), delta, H) * (1 + 1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_fine_tune_with_frozen_and_trained_routers(kind: str, tmp_path: Path) -> None:
    """Routers (``mlp.gate``, ``shared_expert_gate``: a few rows × hidden) cannot hold one singular
    vector at 1/16: a zero delta is skipped, a trained one stored whole; the rest is compressed."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "mixtral":
        config = MixtralConfig(
            **common, intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        )
        make = MixtralForCausalLM
    else:
        config = Qwen2MoeConfig(
            **common,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
        make = Qwen2MoeForCausalLM
    torch.manual_seed(0)
    base = make(config).eval()
    base_dir = save_model(base, tmp_path / "base")
    ft = make(config).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith("self_attn.q_proj.weight") or name.endswith("layers.1.mlp.gate.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # layer 1's router is trained
    ft_dir = save_model(ft, tmp_path / "ft")
    result = compress_checkpoint(base_dir, ft_dir, tmp_path / "c", budget="1/16", progress=False)
    report = result.info["modules"]
    # on disk the router is `block_sparse_moe.gate` (Mixtral) or `mlp.gate` (Qwen2-MoE)
    router = "block_sparse_moe.gate" if kind == "mixtral" else "mlp.gate"
    frozen, trained = f"model.layers.0.{router}", f"model.layers.1.{router}"
    assert report[frozen]["choice"] == "zero" and frozen not in result.modules  # not stored
    entry = report[trained]
    assert entry["choice"].startswith("full-rank fp16") and entry["nbytes"] > entry["budget_nbytes"]
    assert entry["weight_error"] < 1e-3
    q = report["model.layers.0.self_attn.q_proj"]
    assert q["nbytes"] <= q["budget_nbytes"]
    experts = [p for p in report if ".experts." in p]
    assert experts and all(report[p]["choice"] == "zero" for p in experts)  # per-expert 2-D weights
    out = decompress(tmp_path / "c", base_dir, tmp_path / "m", progress=False)
    model = make.from_pretrained(str(out)).eval()
    got = dict(model.named_parameters())["model.layers.1.mlp.gate.weight"]
    expected = dict(ft.named_parameters())["model.layers.1.mlp.gate.weight"]
    assert (got - expected).abs().max() < 1e-3
    if kind == "qwen2_moe":  # shared_expert_gate (1 × hidden): zero here, skipped too
        assert report["model.layers.0.mlp.shared_expert_gate"]["choice"] == "zero"
