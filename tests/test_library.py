"""The adapter library: catalogue contents, factored maths, incremental and resumable indexing, selection."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import load, run_cli

from lorafuse import attach, load_lora
from lorafuse._data import collate, encode_rows
from lorafuse._io import all_finite
from lorafuse.adapters import LoRA, LoRAModule, save_lora
from lorafuse.library import catalog, connect, get, index, query, read_selection, select, stats
from lorafuse.library.select import model_shapes, module_input_means
from lorafuse.library.summary import direction_from_bytes, summarize_factors, summarize_many
from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama, word_tokenizer

GOOD = ["good/patterned", "good/plain", "good/rslora_qv"]
BROKEN = {
    "broken/badjson": ("format", "invalid JSON"),
    "broken/dora": ("unsupported", "use_dora is true"),
    "broken/nan": ("format", "non-finite"),
    "broken/other_base": ("incompatible", "does not fit the base model"),
    "broken/truncated": ("format", "truncated"),
}
ROWS = [
    {"prompt": "w5 w9 w12", "completion": "w40 w41 w7"},
    {"prompt": "w3 w3 w8 w90 w17", "completion": "w60"},
    {"prompt": "w20", "completion": "w21 w22 w23 w24 w25"},
    {"prompt": "w70 w71", "completion": "w72 w73"},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved with a word-level tokenizer (so the CLI can load both)."""
    path = save_model(tiny_llama(0), tmp_path_factory.mktemp("lib_base") / "base")
    word_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def root(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good adapters of different ranks and targets, one broken adapter per reason, a fusion and a
    compressed delta, in nested folders."""
    from lorafuse.compress.api import compress_checkpoint
    from lorafuse.fusion.artefact import Fusion, adapter_hashes, save_fusion

    top = tmp_path_factory.mktemp("library")
    model = load(base_dir)
    good = top / "good"
    random_peft_adapter(model, good / "plain", seed=1, r=4, lora_alpha=8)
    random_peft_adapter(
        model,
        good / "patterned",
        seed=2,
        r=6,
        lora_alpha=12,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    random_peft_adapter(
        model,
        good / "rslora_qv",
        seed=3,
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
    )
    broken = top / "broken"
    weights = "adapter_model.safetensors"
    shutil.copytree(good / "plain", broken / "truncated")
    data = (broken / "truncated" / weights).read_bytes()
    (broken / "truncated" / weights).write_bytes(data[: len(data) // 2])
    shutil.copytree(good / "plain", broken / "badjson")
    (broken / "badjson" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    shutil.copytree(good / "plain", broken / "nan")
    tensors = load_file(str(broken / "nan" / weights))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(broken / "nan" / weights))
    random_peft_adapter(model, broken / "dora", seed=4, r=4, use_dora=True, target_modules=["q_proj"])
    random_peft_adapter(tiny_llama(0, hidden_size=48), broken / "other_base", seed=5, r=4)

    loras = {"plain": good / "plain", "rslora_qv": good / "rslora_qv"}
    fusion = Fusion(
        "static",
        list(loras),
        {"weights": torch.tensor([0.5, 0.5])},
        lora_paths={n: str(p) for n, p in loras.items()},
        lora_hashes={n: adapter_hashes(p) for n, p in loras.items()},
        info={"base_model": str(base_dir)},
    )
    save_fusion(fusion, top / "made" / "fusion_avg")
    finetuned = tiny_llama(0)
    with torch.no_grad():
        for i, (name, p) in enumerate(finetuned.named_parameters()):
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    ft_dir = save_model(finetuned, tmp_path_factory.mktemp("lib_ft") / "ft")
    compress_checkpoint(
        base_dir, ft_dir, top / "made" / "delta", method="low-rank", budget="1/4", progress=False
    )
    return top


@pytest.fixture()
def db(root: Path, base_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "library.sqlite"
    index(path, [root], base=load(base_dir), progress=False)
    return path


def test_catalogue_holds_good_broken_fusion_and_compressed(db: Path, root: Path, base_dir: Path) -> None:
    with connect(db) as con:
        ok = {r["name"]: r for r in query(con)}
        broken = {r["name"]: r for r in query(con, status="broken")}
        assert sorted(ok) == sorted([*GOOD, "made/delta", "made/fusion_avg"])
        assert {n: (r["problem"], r["kind"]) for n, r in broken.items()} == {
            n: (p, "peft") for n, (p, _) in BROKEN.items()
        }
        for name, (_, text) in BROKEN.items():
            assert text in broken[name]["reason"], (name, broken[name]["reason"])
        assert broken["broken/dora"]["peft_type"] == "LORA"  # what the config says is kept

        plain = ok["good/plain"]
        assert plain["kind"] == "peft" and plain["ranks"] == [4] and plain["alphas"] == [8.0]
        assert len(plain["targets"]) == 7 and plain["num_modules"] == 14
        assert plain["num_params"] == load_lora(root / "good" / "plain").num_params
        assert ok["good/patterned"]["ranks"] == [2, 6] and ok["good/patterned"]["alphas"] == [3.0, 12.0]
        assert ok["good/rslora_qv"]["targets"] == ["q_proj", "v_proj"]
        files = get(con, "good/plain")["files"]
        weights = (root / "good" / "plain" / "adapter_model.safetensors").read_bytes()
        import hashlib

        assert files["adapter_model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()

        fusion = get(con, "made/fusion_avg")
        assert fusion["kind"] == "fusion" and fusion["method"] == "static"
        assert fusion["base_model"] == str(base_dir.resolve())
        assert {e["name"]: e["in_catalogue"] for e in fusion["info"]["loras"]} == {
            "plain": "good/plain",
            "rslora_qv": "good/rslora_qv",
        }
        delta = get(con, "made/delta")
        assert delta["kind"] == "compressed" and delta["method"] == "low-rank"
        assert delta["num_modules"] == 14 and delta["info"]["budget"] == 0.25

        assert [r["name"] for r in query(con, targets=["q_proj", "v_proj"], rank=(8, 8))] == [
            "good/rslora_qv"
        ]
        assert [r["name"] for r in query(con, targets=["up_proj"], rank=(None, 6), kind="peft")] == [
            "good/patterned",
            "good/plain",
        ]
        counted = stats(con)
        assert counted["adapters"] == 10 and counted["broken"] == 5
        assert counted["by_problem"] == {"format": 3, "incompatible": 1, "unsupported": 1}


def test_norms_and_directions_equal_the_dense_ones(db: Path, root: Path) -> None:
    with connect(db) as con:
        for name in GOOD:
            lora = load_lora(root / name)
            entry = get(con, name)
            norms = {}
            for m in entry["modules"]:
                dense = lora.modules[m["path"]].delta(torch.float64)  # (out, in)
                assert m["norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
                _, s, vh = torch.linalg.svd(dense, full_matrices=False)
                assert m["sigma1"] == pytest.approx(float(s[0]), rel=1e-5)
                (blob,) = con.execute(
                    "SELECT direction FROM modules WHERE adapter_id = ? AND path = ?",
                    (entry["id"], m["path"]),
                ).fetchone()
                stored = direction_from_bytes(blob).double()
                assert abs(float(stored @ vh[0])) == pytest.approx(1.0, abs=1e-3)  # float16, up to sign
                norms.setdefault(m["kind"], []).append(float(torch.linalg.matrix_norm(dense)))
            for kind, values in norms.items():
                assert entry["norms"][kind]["max"] == pytest.approx(max(values), rel=1e-5)


def test_a_low_rank_compressed_delta_has_the_norms_and_directions_of_its_dense_delta(
    db: Path, root: Path, base_dir: Path, tmp_path: Path
) -> None:
    from lorafuse.compress import load_compressed

    delta = load_compressed(root / "made" / "delta")
    with connect(db) as con:
        entry = get(con, "made/delta")
        assert entry["kind"] == "compressed" and len(entry["modules"]) == len(delta.modules) == 14
        for m in entry["modules"]:
            B, A = delta.modules[m["path"]].factors()  # (out, r), (r, in)
            dense = B.double() @ A.double()  # (out, in)
            assert m["rank"] == A.shape[0] and m["alpha"] == pytest.approx(A.shape[0])
            assert m["norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
            _, _, vh = torch.linalg.svd(dense, full_matrices=False)
            (blob,) = con.execute(
                "SELECT direction FROM modules WHERE adapter_id = ? AND path = ?", (entry["id"], m["path"])
            ).fetchone()
            assert abs(float(direction_from_bytes(blob).double() @ vh[0])) == pytest.approx(1.0, abs=1e-3)
        assert entry["total_norm"] > 0 and set(entry["norms"]) == set(entry["targets"])
    from lorafuse.compress.api import compress_checkpoint

    ft = tmp_path / "ft"  # a dense (BitDelta) delta keeps the description's columns only
    save_model(tiny_llama(1), ft)
    compress_checkpoint(base_dir, ft, tmp_path / "deltas" / "signs", method="bitdelta", progress=False)
    index(tmp_path / "dense.sqlite", [tmp_path / "deltas"], base=load(base_dir), progress=False)
    with connect(tmp_path / "dense.sqlite") as con:
        signs = get(con, "signs")
        assert signs["status"] == "ok" and signs["method"] == "bitdelta" and signs["num_modules"] == 14
        assert signs["norms"] is None and all(m["norm"] is None for m in signs["modules"])
    other = tmp_path / "other.sqlite"  # a base of other shapes: the delta does not fit it
    index(other, [root / "made"], base=tiny_llama(0, hidden_size=48), progress=False)
    with connect(other) as con:
        (broken,) = query(con, status="broken", kind="compressed")
        assert broken["problem"] == "incompatible" and "delta" in broken["reason"]


def test_factored_summary_in_float64_matches_svd_with_a_rank_deficient_factor() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 40, generator=g, dtype=torch.float64)
    B = torch.randn(30, 5, generator=g, dtype=torch.float64)
    B[:, 4] = B[:, 0]  # rank 4 product
    s = summarize_factors(A, B, 0.7)
    _, sv, vh = torch.linalg.svd(0.7 * B @ A, full_matrices=False)
    assert s.norm == pytest.approx(float(sv.norm()), rel=1e-10)
    assert s.sigma1 == pytest.approx(float(sv[0]), rel=1e-10)
    assert abs(float(s.direction.double() @ vh[0])) == pytest.approx(1.0, abs=1e-6)
    assert summarize_factors(torch.zeros(2, 6), torch.zeros(3, 2), 1.0).norm == 0.0


def _counting(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[Path]:
    calls: list[Path] = []
    armed = [fail_at]

    def loader(path: Path, **kwargs: object) -> LoRA:
        calls.append(Path(path))
        if armed[0] is not None and len(calls) == armed[0]:
            armed[0] = None
            calls.clear()
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of the run
        return load_lora(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "load_lora", loader)
    return calls


def test_batched_summaries_equal_one_module_at_a_time() -> None:
    """``summarize_many`` groups equal shapes into one batched product and eigensolve: the same
    norms, top singular values and directions as ``summarize_factors`` module by module (float16,
    float32 and float64 factors, a zero ``B``, a rank-deficient ``A``, a lone shape)."""
    g = torch.Generator().manual_seed(3)
    factors = []
    for i in range(7):
        a, b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
        factors.append((a, b * (i != 2), 0.5 + i))  # module 2: B = 0
    deficient = torch.randn(1, 24, generator=g).repeat(4, 1)
    factors.append((deficient, torch.randn(16, 4, generator=g), 2.0))
    factors.append((torch.randn(8, 32, generator=g), torch.randn(10, 8, generator=g), 1.0))  # alone
    factors += [(a.half(), b.half(), s) for a, b, s in factors[:3]]
    factors += [(a.double(), b.double(), s) for a, b, s in factors[:3]]
    many = summarize_many(factors)
    assert len(many) == len(factors)
    small = summarize_many(factors, max_batch_bytes=2 * 8 * (4 * 24 + 16 * 4))  # batches of two
    assert [s.norm for s in small] == pytest.approx([s.norm for s in many], rel=1e-6)
    for (a, b, scale), got in zip(factors, many, strict=True):
        want = summarize_factors(a, b, scale)
        assert got.norm == pytest.approx(want.norm, rel=1e-5, abs=1e-6)
        assert got.sigma1 == pytest.approx(want.sigma1, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(got.direction, want.direction, atol=1e-4, rtol=0)
    assert many[2].norm == 0 and not many[2].direction.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact(dtype: torch.dtype) -> None:
    t = torch.randn(64, 128).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[5, 7] = bad
        assert not all_finite(u)
    u = t.clone()
    u[0, 0], u[1, 1] = float("inf"), float("-inf")  # a sum of NaN
    assert not all_finite(u)
    big = torch.full((4, 4), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    assert all_finite(big)


def test_reindex_reads_nothing_unchanged_and_rereads_a_changed_adapter(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "loras"
    shutil.copytree(root / "good", folder)
    db = tmp_path / "lib.sqlite"
    calls = _counting(monkeypatch)
    first = index(db, [folder], progress=False)
    assert (first.added, len(calls)) == (3, 3)
    hashed: list[Path] = []
    real_sha = catalog._sha256_file
    monkeypatch.setattr(catalog, "_sha256_file", lambda p, *a: hashed.append(p) or real_sha(p, *a))
    again = index(db, [folder], progress=False)
    assert (again.unchanged, again.added, again.updated, len(calls), hashed) == (3, 0, 0, 3, [])

    with connect(db) as con:
        before = get(con, "plain")["total_norm"]
    config = json.loads((folder / "plain" / "adapter_config.json").read_text())
    config["lora_alpha"] = 16  # twice the scale: twice every norm
    (folder / "plain" / "adapter_config.json").write_text(json.dumps(config))
    changed = index(db, [folder], progress=False)
    assert (changed.updated, changed.unchanged, calls[-1].name, len(calls)) == (1, 2, "plain", 4)
    with connect(db) as con:
        assert get(con, "plain")["total_norm"] == pytest.approx(2 * before, rel=1e-6)

    shutil.rmtree(folder / "patterned")
    removed = index(db, [folder], progress=False)
    assert removed.removed == 1 and len(calls) == 4
    with connect(db) as con:
        assert [r["name"] for r in query(con)] == ["plain", "rslora_qv"]
        assert con.execute("SELECT COUNT(*) FROM modules m LEFT JOIN adapters a ON a.id = m.adapter_id "
                           "WHERE a.id IS NULL").fetchone()[0] == 0  # fmt: skip


def test_interrupted_index_leaves_a_consistent_catalogue_and_the_next_run_completes(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "lib.sqlite"
    calls = _counting(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        index(db, [root / "good"], progress=False)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT name FROM adapters").fetchall() == [("patterned",)]
    assert con.execute("SELECT COUNT(*) FROM modules").fetchone()[0] == 14
    con.close()
    done = index(db, [root / "good"], progress=False)
    assert (done.unchanged, done.added, sorted(p.name for p in calls)) == (1, 2, ["plain", "rslora_qv"])


def _examples() -> list:
    return encode_rows(word_tokenizer(), ROWS)


def test_loss_selection_equals_one_adapter_at_a_time(db: Path, root: Path, base_dir: Path) -> None:
    examples = _examples()
    model = load(base_dir)
    with connect(db) as con:
        selection = select(con, "loss", model=model, examples=examples, batch_size=3, group=2)
    assert [r["name"] for r in selection.ranked] == sorted(
        [r["name"] for r in selection.ranked],
        key=lambda n: next(x["score"] for x in selection.ranked if x["name"] == n),
    )
    assert {r["name"] for r in selection.ranked} == set(GOOD)  # the fusion and delta are not candidates
    batch = collate(examples, 0)
    for row in selection.ranked:
        reference = load(base_dir)
        attach(reference, {"x": load_lora(row["path"])})
        with torch.no_grad():
            expected = reference(**batch).loss  # mean over every labelled token
        assert row["score"] == pytest.approx(float(expected), abs=1e-4)
    with torch.no_grad():
        base_loss = load(base_dir)(**batch).loss
    assert selection.info["base_loss"] == pytest.approx(float(base_loss), abs=1e-4)
    assert not any(type(m).__name__ == "LoRABank" for m in model.modules())  # the pool is detached


def test_module_inputs_are_what_the_base_layers_take(base_dir: Path) -> None:
    """``q_proj`` takes the decoder layer's normed residual stream, ``o_proj`` the attention's
    output: each module's mean input is its own, per example, over its real tokens only."""
    model = load(base_dir)
    examples = _examples()
    paths = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    means = module_input_means(model, examples, 0, paths, batch_size=3)
    assert set(means) == set(paths) and means[paths[0]].shape == (len(examples), 32)
    layer = model.model.layers[1]
    for e, example in enumerate(examples):  # one example at a time: no padding
        ids = torch.tensor([example[0]])
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # (1, T, hidden)
            want = layer.input_layernorm(states)[0].mean(0)  # (hidden,)
        assert torch.allclose(means[paths[0]][e], want, atol=1e-5)
    assert not torch.allclose(means[paths[1]], means[paths[0]], atol=1e-2)


def test_similarity_prefers_the_adapter_aligned_with_the_module_inputs(
    root: Path, base_dir: Path, tmp_path: Path
) -> None:
    model = load(base_dir)
    examples = _examples()
    paths = [f"model.layers.{layer}.self_attn.q_proj" for layer in range(2)]
    means = module_input_means(model, examples, 0, paths)  # {path: (E, in)}
    g = torch.Generator().manual_seed(7)
    modules = {}
    for path in paths:
        h = means[path].mean(0)  # (in,)
        A = torch.stack([h / h.norm(), 0.01 * torch.randn(32, generator=g)])  # (2, in)
        modules[path] = LoRAModule(A, torch.randn(32, 2, generator=g), 1.0)
    folder = tmp_path / "loras"
    save_lora(LoRA(modules, name="aligned"), folder / "aligned")
    for name in GOOD:
        shutil.copytree(root / name, folder / name.split("/")[1])
    db = tmp_path / "lib.sqlite"
    index(db, [folder], progress=False)
    with connect(db) as con:
        selection = select(con, "similarity", model=model, examples=examples)
    expected = torch.stack(
        [
            (
                means[p] / means[p].norm(dim=-1, keepdim=True) @ (means[p].mean(0) / means[p].mean(0).norm())
            ).abs()
            for p in paths
        ]
    ).mean()
    assert selection.ranked[0]["name"] == "aligned"
    assert selection.ranked[0]["score"] == pytest.approx(float(expected), abs=1e-2)
    assert selection.ranked[1]["score"] < selection.ranked[0]["score"] / 2


def test_random_is_seeded_and_norm_orders_by_the_largest_delta(db: Path, root: Path, base_dir: Path) -> None:
    shapes = model_shapes(load(base_dir))
    with connect(db) as con:
        runs = [
            [r["name"] for r in select(con, "random", shapes=shapes, seed=s).ranked] for s in (0, 0, 1, 2, 3)
        ]
        by_norm = select(con, "norm", shapes=shapes).ranked
    assert runs[0] == runs[1] and sorted(runs[0]) == sorted(GOOD)
    assert any(r != runs[0] for r in runs[2:])
    dense = {
        n: float(
            torch.sqrt(
                sum(m.delta(torch.float64).square().sum() for m in load_lora(root / n).modules.values())
            )
        )
        for n in GOOD
    }
    assert [r["name"] for r in by_norm] == sorted(dense, key=lambda n: -dense[n])
    for r in by_norm:
        assert r["score"] == pytest.approx(dense[r["name"]], rel=1e-5)


def test_cli_index_ls_show_stats_and_select(
    root: Path, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "lib.sqlite"
    code, out, err = run_cli(["library", "index", root, "--db", db, "--base", base_dir, "--quiet"], capsys)
    assert code == 0, err
    assert "10 adapters: 10 added" in out and "5 broken" in out
    code, out, _ = run_cli(["library", "ls", "--db", db, "--json"], capsys)
    assert sorted(r["name"] for r in json.loads(out)) == sorted([*GOOD, "made/delta", "made/fusion_avg"])
    code, out, _ = run_cli(["library", "ls", "--db", db, "--target", "v_proj", "--rank", "6:8"], capsys)
    assert code == 0 and "good/rslora_qv" in out and "good/patterned" in out and "good/plain" not in out
    code, out, _ = run_cli(["library", "ls", "--db", db, "--broken", "--json"], capsys)
    assert {r["name"]: r["problem"] for r in json.loads(out)} == {n: p for n, (p, _) in BROKEN.items()}
    code, out, _ = run_cli(["library", "ls", "--db", db, "--broken"], capsys)
    assert "broken/truncated  [format]" in out and "truncated" in out
    code, out, _ = run_cli(["library", "show", "good/rslora_qv", "--db", db], capsys)
    assert code == 0 and "rank(s)      8" in out and "q_proj, v_proj (4 modules)" in out
    code, out, _ = run_cli(["library", "show", "made/fusion_avg", "--db", db, "--json"], capsys)
    assert json.loads(out)["info"]["loras"][0]["in_catalogue"] == "good/plain"
    code, out, _ = run_cli(["library", "stats", "--db", db, "--json"], capsys)
    assert json.loads(out)["by_kind"] == {"compressed": 1, "fusion": 1, "peft": 8}

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    selection = tmp_path / "selection.json"
    args = ["library", "select", "--db", db, "--base", base_dir, "--train", train, "--k", "2", "--by", "loss"]
    code, out, err = run_cli([*args, "--out", selection, "--batch-size", "5"], capsys)
    assert code == 0, err
    saved = json.loads(selection.read_text())
    assert saved["by"] == "loss" and len(saved["loras"]) == 2 and len(saved["scores"]) == 3
    assert list(saved["loras"]) == list(saved["scores"])[:2] and next(iter(saved["loras"])) in out
    assert read_selection(selection) == {n: Path(p) for n, p in saved["loras"].items()}
    code, out, err = run_cli([*args[:-1], "norm", "--json"], capsys)
    assert code == 0 and json.loads(out)["by"] == "norm"
    code, out, err = run_cli([*args[:-1], "similarity", "--json", "--target", "q_proj"], capsys)
    assert code == 0 and len(json.loads(out)["scores"]) == 3, err


def test_cli_errors_are_one_line_and_status_2(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    cases = [
        (["library", "index", tmp_path / "missing", "--db", db], "no such folder to index"),
        (["library", "ls", "--db", bad], "not a lorafuse catalogue"),
        (["library", "ls", "--db", other], "not a lorafuse catalogue"),
        (["library", "ls", "--db", tmp_path / "none.sqlite"], "no catalogue here"),
        (["library", "show", "nope", "--db", db], "no adapter named 'nope'"),
        (["library", "ls", "--db", db, "--rank", "9:3"], "larger than the maximum"),
        (
            ["library", "select", "--db", db, "--base", tmp_path / "nobase", "--by", "norm"],
            "no such model folder",
        ),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with connect(db) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    code, _, err = run_cli(["library", "ls", "--db", db], capsys)
    assert code == 2 and "schema version 99" in err
    assert not (tmp_path / "none.sqlite").exists()


def test_a_new_base_rechecks_unchanged_adapters_once(
    root: Path, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "loras"
    shutil.copytree(root / "good" / "plain", folder / "plain")
    shutil.copytree(root / "broken" / "other_base", folder / "other_base")
    db = tmp_path / "lib.sqlite"
    calls = _counting(monkeypatch)
    index(db, [folder], progress=False)  # no base: both usable
    with connect(db) as con:
        assert [r["name"] for r in query(con)] == ["other_base", "plain"]
    checked = index(db, [folder], base=load(base_dir), progress=False)
    assert (checked.updated, len(calls)) == (2, 4)
    with connect(db) as con:
        assert [r["name"] for r in query(con)] == ["plain"]
        assert [r["problem"] for r in query(con, status="broken")] == ["incompatible"]
    again = index(db, [folder], base=load(base_dir), progress=False)
    assert (again.unchanged, len(calls)) == (2, 4)


def test_read_selection_resolves_relative_folders_and_refuses_other_files(tmp_path: Path) -> None:
    from lorafuse.library import LibraryError

    (tmp_path / "loras" / "a").mkdir(parents=True)
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"loras": {"a": "loras/a"}, "by": "norm", "scores": {"a": 1.0}}))
    assert read_selection(selection) == {"a": (tmp_path / "loras" / "a").resolve()}
    for bad in ('{"loras": {}}', '{"loras": {"a": 3}}', "[1, 2]", "{oops"):
        selection.write_text(bad)
        with pytest.raises(LibraryError, match=str(selection)):
            read_selection(selection)


def test_a_selection_feeds_merge_and_fuse(
    root: Path, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``merge @selection.json`` merges the selection's folders (best first), and ``fuse --lora
    @selection.json`` names them as ``--lora NAME=DIR`` would."""
    from lorafuse.cli.fuse import pairs

    db = tmp_path / "lib.sqlite"
    assert run_cli(["library", "index", root, "--db", db, "--base", base_dir, "--quiet"], capsys)[0] == 0
    selection = tmp_path / "selection.json"
    args = [
        "library",
        "select",
        "--db",
        db,
        "--base",
        base_dir,
        "--k",
        "2",
        "--by",
        "norm",
        "--out",
        selection,
    ]
    assert run_cli(args, capsys)[0] == 0
    chosen = read_selection(selection)
    assert len(chosen) == 2
    assert pairs([f"@{selection}"], "--lora") == {name: str(path) for name, path in chosen.items()}
    assert list(pairs([f"@{selection}", f"extra={root}"], "--lora")) == [*chosen, "extra"]
    with pytest.raises(Exception, match="given twice"):
        pairs([f"@{selection}", f"{next(iter(chosen))}={root}"], "--lora")

    by_selection, by_folders = tmp_path / "m1", tmp_path / "m2"
    code, _, err = run_cli(["merge", f"@{selection}", "--method", "linear", "--out", by_selection], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", *chosen.values(), "--method", "linear", "--out", by_folders], capsys)
    assert code == 0, err
    one, two = load_lora(by_selection), load_lora(by_folders)
    assert one.modules.keys() == two.modules.keys()
    for path, module in one.modules.items():
        assert torch.equal(module.delta(), two.modules[path].delta()), path
    code, _, err = run_cli(
        ["merge", f"@{tmp_path / 'none.json'}", "--method", "linear", "--out", tmp_path / "x"], capsys
    )
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
