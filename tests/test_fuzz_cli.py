"""Fuzz suite of command-line values: a bad value of any flag of any verb is one line and exit 2.

One table of cases, ``(id, argv, expected substring)``. An argv names fixture paths in braces:
``{base}`` a tiny Llama folder (no tokenizer), ``{tok}`` a word-level tokenizer folder, ``{a}`` /
``{b}`` two PEFT adapters of the base, ``{train}`` a valid JSON-lines file, ``{latin1}`` a file that
is not UTF-8, ``{empty}`` an empty folder, ``{missing}`` a path that does not exist, ``{recipe_*}``
merge recipes, ``{modes_*}`` mode tables, ``{out}`` an output path. Every case asserts: exit status
2, the substring on stderr, stderr one line without a traceback, nothing written at ``{out}``,
the adapters unchanged (by hash). The bad value is refused before any model is loaded, so the
whole table runs in seconds.

Three cases need a real run and sit below the table: ``inspect`` goes past adapters that fail in
any way, and ``--max-new-tokens 100000`` is capped at the model's context with a notice (through
``route generate --arrow``, whose default ``--top-k`` also adapts to two LoRAs, and ``generate``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_cli
from lorafuse.tiny import word_tokenizer

FUSE = "fuse --base {base} --lora a={a} --train {train} --out {out}"
MERGE = "merge {a} {b} --out {out}"
ROUTE_TRAIN = "route train --base {base} --data {train} --out {out}"
ENCODER = "route train-encoder --base {base} --lora {a} --data {train} --out {out}"
ARROW = "route generate --arrow --lora {a} --base {base} --tokenizer {tok} -p x"
COMPRESS = "compress --base {base} --finetuned {base} --out {out}"
PROMPT = "w5 w6 w7"  # 3 words + <s> = 4 prompt tokens; tiny_llama's context is 256

CASES: list[tuple[str, str, str]] = [
    # merge
    ("merge-weights-nan", MERGE + " -m linear --weights nan,1", "--weights must be a finite number, got nan"),
    ("merge-weights-inf", MERGE + " -m linear --weights 1,inf", "--weights must be a finite number, got inf"),
    ("merge-weights-overflow", MERGE + " -m linear --weights 1e400,1", "--weights must be a finite"),
    ("merge-weights-huge", MERGE + " -m linear --weights 1e7,1", "--weights must be ≥ -1e+06 and ≤ 1e+06"),
    ("merge-weights-text", MERGE + " -m linear --weights a,b", "--weights must be comma-separated numbers"),
    ("merge-weights-count", MERGE + " -m linear --weights 1,2,3", "--weights gives 3 weight(s) for 2"),
    (
        "merge-dtype-int8",
        MERGE + " -m linear --dtype int8",
        "--dtype must be one of float32, float16, bfloat16; got 'int8'",
    ),
    ("merge-dtype-bogus", MERGE + " -m linear --dtype bogus", "--dtype must be one of float32"),
    ("merge-method-bogus", MERGE + " -m bogus", "--method must be one of cat, dare-linear"),
    ("merge-rank-0", MERGE + " -m svd --rank 0", "--rank must be ≥ 1"),
    ("merge-rank-negative", MERGE + " -m svd --rank -3", "--rank must be ≥ 1"),
    (
        "merge-density-1.5",
        MERGE + " -m ties --density 1.5",
        "--density: Input should be less than or equal to 1 (got 1.5)",
    ),
    ("merge-density-0", MERGE + " -m ties --density 0", "--density: Input should be greater than 0"),
    ("merge-density-nan", MERGE + " -m dare_ties --density nan", "--density: Input should be"),
    (
        "merge-density-not-a-setting",
        MERGE + " -m linear --density 0.5",
        "--density: linear has no setting 'density'",
    ),
    (
        "merge-majority-sign",
        MERGE + " -m ties --majority-sign-method most",
        "--majority-sign-method must be one of total, frequency",
    ),
    ("merge-seed-negative", MERGE + " -m linear --seed -1", "--seed must be ≥ 0 and ≤ 4294967295, got -1"),
    (
        "merge-seed-over-64-bits",
        MERGE + " -m linear --seed 18446744073709551617",
        "--seed must be ≥ 0 and ≤ 4294967295",
    ),
    ("merge-set-no-equals", MERGE + " -m ties --set density", "--set takes KEY=VALUE, got 'density'"),
    (
        "merge-set-text",
        MERGE + " -m ties --set density=abc",
        "--set density: Input should be a valid number (got 'abc')",
    ),
    ("merge-set-unknown", MERGE + " -m ties --set bogus=1", "--set bogus: ties has no setting 'bogus'"),
    ("merge-set-not-yaml", MERGE + " -m ties --set density=[", "--set density: '[' is not a value"),
    ("merge-set-nan", MERGE + " -m linear --set tol=.nan", "--set tol must be a finite number, got nan"),
    (
        "merge-set-bool-as-int",
        MERGE + " -m lego --set n_init=true",
        "--set n_init: Input should be a valid integer (got True)",
    ),
    (
        "merge-set-range",
        MERGE + " -m ties --set svd_iters=99",
        "--set svd_iters: Input should be less than or equal to 20",
    ),
    ("merge-set-twice", MERGE + " -m ties --set density=0.5 --set density=0.6", "--set density: given twice"),
    (
        "merge-recipe-nan-weight",
        "merge {recipe_nan} --out {out}",
        "models.0.weight: must be a finite number (got nan)",
    ),
    (
        "merge-recipe-seed",
        "merge {recipe_seed} --out {out}",
        "seed: Input should be greater than or equal to 0",
    ),
    # fuse
    ("fuse-dtype-bogus", FUSE + " --dtype bogus", "--dtype must be one of float32"),
    ("fuse-dtype-int8", FUSE + " --dtype int8", "--dtype must be one of float32"),
    (
        "fuse-device-bogus",
        FUSE + " --device bogus",
        "--device must be auto, cpu, cuda, cuda:N or mps; got 'bogus'",
    ),
    ("fuse-device-meta", FUSE + " --device meta", "--device must be auto, cpu"),
    ("fuse-device-absent-gpu", FUSE + " --device cuda:99", "--device cuda:99: "),
    ("fuse-batch-size-0", FUSE + " --batch-size 0", "--batch-size must be ≥ 1"),
    ("fuse-batch-size-negative", FUSE + " --batch-size -4", "--batch-size must be ≥ 1"),
    ("fuse-epochs-negative", FUSE + " --epochs -1", "--epochs must be > 0"),
    ("fuse-epochs-0", FUSE + " --epochs 0", "--epochs must be > 0"),
    ("fuse-epochs-nan", FUSE + " --epochs nan", "--epochs must be a finite number"),
    ("fuse-lr-nan", FUSE + " --lr nan", "--lr must be a finite number, got nan"),
    ("fuse-lr-inf", FUSE + " --lr inf", "--lr must be a finite number, got inf"),
    ("fuse-lr-0", FUSE + " --lr 0", "--lr must be > 0"),
    ("fuse-temperature-0", FUSE + " --temperature 0", "--temperature must be > 0"),
    ("fuse-temperature-nan", FUSE + " --temperature nan", "--temperature must be a finite"),
    ("fuse-granularity", FUSE + " --granularity token", "--granularity must be one of layer, module, step"),
    (
        "fuse-method",
        FUSE + " --method bogus",
        "--method must be one of average, cat-weights, lora-flow, lorahub",
    ),
    ("fuse-seed", FUSE + " --seed -1", "--seed must be ≥ 0"),
    (
        "fuse-train-missing",
        "fuse --base {base} --lora a={a} --train {missing} --out {out}",
        "--train {missing}: no such file",
    ),
    (
        "fuse-train-latin1",
        "fuse --base {base} --lora a={a} --train {latin1} --out {out}",
        "--train {latin1}: not UTF-8 text",
    ),
    (
        "fuse-dev-missing",
        "fuse --base {base} --lora a={a} --train {train} --dev {missing} --out {out}",
        "--dev {missing}: no such file",
    ),
    (
        "fuse-base-missing",
        "fuse --base {missing} --lora a={a} --train {train} --out {out}",
        "--base {missing}: no such folder",
    ),
    (
        "fuse-tokenizer-missing",
        "fuse --base {base} --lora a={a} --train {train} --tokenizer {missing} --out {out}",
        "--tokenizer {missing}: no such folder",
    ),
    # generate, explain
    (
        "generate-max-new-tokens-negative",
        "generate --fusion {empty} --prompt x --max-new-tokens -5",
        "--max-new-tokens must be ≥ 1",
    ),
    (
        "generate-max-new-tokens-0",
        "generate --fusion {empty} --prompt x --max-new-tokens 0",
        "--max-new-tokens must be ≥ 1",
    ),
    (
        "generate-dtype",
        "generate --fusion {empty} --prompt x --dtype float64",
        "--dtype must be one of float32",
    ),
    ("generate-device", "generate --fusion {empty} --prompt x --device tpu", "--device must be auto, cpu"),
    (
        "generate-fusion-missing",
        "generate --fusion {missing} --prompt x",
        "--fusion {missing}: no such folder",
    ),
    (
        "explain-max-new-tokens",
        "explain --fusion {empty} --prompt x --out {out} --max-new-tokens 0",
        "--max-new-tokens must be ≥ 1",
    ),
    # route train / train-encoder / generate
    ("route-train-router", ROUTE_TRAIN + " --router moe", "--router must be one of softmax, remix"),
    ("route-train-experts-0", ROUTE_TRAIN + " --experts 0", "--experts must be ≥ 1"),
    ("route-train-top-k-0", ROUTE_TRAIN + " --top-k 0", "--top-k must be ≥ 1"),
    (
        "route-train-top-k-over-experts",
        ROUTE_TRAIN + " --experts 2 --top-k 3",
        "--top-k (experts per token, of --experts 2) must be ≤ 2, got 3",
    ),
    ("route-train-rank-0", ROUTE_TRAIN + " --rank 0", "--rank must be ≥ 1"),
    ("route-train-alpha-nan", ROUTE_TRAIN + " --alpha nan", "--alpha must be a finite number"),
    ("route-train-alpha-0", ROUTE_TRAIN + " --alpha 0", "--alpha must be > 0"),
    ("route-train-samples-0", ROUTE_TRAIN + " --samples 0", "--samples must be ≥ 1"),
    ("route-train-balance-negative", ROUTE_TRAIN + " --balance -1", "--balance must be ≥ 0"),
    ("route-train-balance-nan", ROUTE_TRAIN + " --balance nan", "--balance must be a finite number"),
    ("route-train-steps-0", ROUTE_TRAIN + " --steps 0", "--steps must be ≥ 1"),
    ("route-train-batch-size-0", ROUTE_TRAIN + " --batch-size 0", "--batch-size must be ≥ 1"),
    ("route-train-lr-nan", ROUTE_TRAIN + " --lr nan", "--lr must be a finite number"),
    ("route-train-seed", ROUTE_TRAIN + " --seed 4294967296", "--seed must be ≥ 0 and ≤ 4294967295"),
    (
        "route-train-tasks",
        "route train --base {base} --out {out} --tasks math,bogus",
        "--tasks: unknown 'bogus'",
    ),
    (
        "route-train-data-missing",
        "route train --base {base} --data {missing} --out {out}",
        "--data {missing}: no such file",
    ),
    (
        "route-train-data-latin1",
        "route train --base {base} --data {latin1} --out {out}",
        "--data {latin1}: not UTF-8 text",
    ),
    (
        "route-train-base-missing",
        "route train --base {missing} --data {train} --out {out}",
        "--base {missing}: no such folder",
    ),
    ("route-train-no-tokenizer", ROUTE_TRAIN, "--tokenizer {base}: no tokenizer"),
    ("route-encoder-activation", ENCODER + " --activation relu", "--activation must be one of softmax, tanh"),
    ("route-encoder-top-k-0", ENCODER + " --top-k 0", "--top-k must be ≥ 1"),
    (
        "route-encoder-top-k-over-basis",
        ENCODER + " --top-k 3",
        "--top-k (coefficients kept, of 1 LoRAs) must be ≤ 1, got 3",
    ),
    ("route-encoder-dim-0", ENCODER + " --dim 0", "--dim must be ≥ 1"),
    ("route-encoder-steps", ENCODER + " --steps -1", "--steps must be ≥ 1"),
    ("route-encoder-lr-0", ENCODER + " --lr 0", "--lr must be > 0"),
    ("route-encoder-seed", ENCODER + " --seed -1", "--seed must be ≥ 0"),
    (
        "route-generate-top-k-over-loras",
        "route generate --arrow --lora {a} --lora {b} --base {base} --tokenizer {tok} -p x --top-k 3",
        "--top-k (LoRAs per token, of the 2 --lora) must be ≤ 2, got 3",
    ),
    ("route-generate-top-k-0", ARROW + " --top-k 0", "--top-k must be ≥ 1"),
    ("route-generate-temperature-0", ARROW + " --temperature 0", "--temperature must be > 0"),
    ("route-generate-max-new-tokens", ARROW + " --max-new-tokens -5", "--max-new-tokens must be ≥ 1"),
    (
        "route-generate-modes-missing",
        "route generate --mode m --modes {missing} --lora {a} --base {base} --tokenizer {tok} -p x",
        "--modes {missing}: no such file",
    ),
    (
        "route-generate-modes-not-yaml",
        "route generate --mode m --modes {modes_broken} --lora {a} --base {base} --tokenizer {tok} -p x",
        "--modes {modes_broken}: not YAML or JSON",
    ),
    (
        "route-generate-modes-not-mapping",
        "route generate --mode m --modes {modes_list} --lora {a} --base {base} --tokenizer {tok} -p x",
        "expected a mapping",
    ),
    (
        "route-generate-mixture-missing",
        "route generate --mixture {missing} -p x",
        "--mixture {missing}: no such folder",
    ),
    # compress, decompress
    (
        "compress-method",
        COMPRESS + " --method zip",
        "--method must be one of bitdelta, delta-come, low-rank, rtn",
    ),
    ("compress-budget-nan", COMPRESS + " --budget nan", "--budget: budget 'nan' is not a ratio"),
    ("compress-budget-2", COMPRESS + " --budget 2", "--budget: budget '2' must be a ratio in (0, 1]"),
    ("compress-budget-0", COMPRESS + " --budget 0", "--budget: budget '0' must be a ratio"),
    ("compress-budget-div-0", COMPRESS + " --budget 1/0", "--budget: budget '1/0' is not a ratio"),
    ("compress-quantizer", COMPRESS + " --quantizer awq", "--quantizer must be one of gptq, rtn"),
    (
        "compress-quantizer-not-a-setting",
        COMPRESS + " -m low-rank --quantizer rtn",
        "--quantizer: low-rank has no setting 'quantizer'",
    ),
    ("compress-keep-other", COMPRESS + " --keep-other both", "--keep-other must be one of base, delta"),
    ("compress-samples-0", COMPRESS + " --samples 0", "--samples must be ≥ 1"),
    ("compress-max-tokens-0", COMPRESS + " --max-tokens 0", "--max-tokens must be ≥ 1"),
    ("compress-seed", COMPRESS + " --seed -1", "--seed must be ≥ 0"),
    ("compress-distill-steps", COMPRESS + " --distill-steps -1", "--distill-steps must be ≥ 0"),
    (
        "compress-schedule-bits",
        COMPRESS + " --schedule 9:2",
        "--schedule: schedule '9:2': bit widths must be 1..8",
    ),
    ("compress-schedule-text", COMPRESS + " --schedule abc", "--schedule: schedule 'abc'"),
    (
        "compress-set-group-size-0",
        COMPRESS + " --set group_size=0",
        "--set group_size: Input should be greater than or equal to 1",
    ),
    ("compress-set-damp-nan", COMPRESS + " --set damp=.nan", "--set damp must be a finite number"),
    (
        "compress-set-damp-negative",
        COMPRESS + " --set damp=-1",
        "--set damp: Input should be greater than or equal to 0",
    ),
    ("compress-set-unknown", COMPRESS + " --set bits=3", "--set bits: delta-come has no setting 'bits'"),
    (
        "compress-set-bool",
        COMPRESS + " --set act_order=1",
        "--set act_order: Input should be a valid boolean",
    ),
    (
        "compress-rtn-group-size-0",
        COMPRESS + " -m rtn --set group_size=0",
        "--set group_size: Input should be greater than or equal to 1",
    ),
    ("compress-calib-missing", COMPRESS + " --calib {missing}", "--calib {missing}: no such file"),
    (
        "compress-base-missing",
        "compress --base {missing} --finetuned {base} --out {out}",
        "--base {missing}: no such folder",
    ),
    (
        "decompress-base-missing",
        "decompress {empty} --base {missing} --out {out}",
        "--base {missing}: no such folder",
    ),
    # demo and world
    (
        "demo-profile",
        "demo --profile huge --report {out}",
        "--profile must be one of default, tiny; got 'huge'",
    ),
    ("demo-seeds-0", "demo --seeds 0 --report {out}", "--seeds must be ≥ 1"),
    ("demo-limit-0", "demo --limit 0 --report {out}", "--limit must be ≥ 1"),
    ("demo-epochs-nan", "demo --epochs nan --report {out}", "--epochs must be a finite number"),
    ("demo-world-seed", "demo --world-seed -1 --report {out}", "--world-seed must be ≥ 0"),
    ("demo-composites", "demo --composites math_zorb,bogus --report {out}", "--composites: unknown 'bogus'"),
    (
        "world-build-profile",
        "world build --profile bogus --dir {out}",
        "--profile must be one of default, tiny",
    ),
    ("world-build-seed-negative", "world build --seed -1 --dir {out}", "--seed must be ≥ 0"),
    (
        "world-build-seed-huge",
        "world build --seed 4294967296 --dir {out}",
        "--seed must be ≥ 0 and ≤ 4294967295, got 4294967296",
    ),
    (
        "world-eval-profile",
        "world eval --profile bogus --dir {out}",
        "--profile must be one of default, tiny",
    ),
    ("world-eval-limit", "world eval --limit 0 --dir {out}", "--limit must be ≥ 1"),
    ("world-eval-seed", "world eval --seed -2 --dir {out}", "--seed must be ≥ 0"),
    ("world-merge-study-limit", "world merge-study --limit -3 --dir {out}", "--limit must be ≥ 1"),
    (
        "world-merge-study-profile",
        "world merge-study --profile x --dir {out}",
        "--profile must be one of default, tiny",
    ),
    ("world-flow-ablation-seeds", "world flow-ablation --seeds 0 --dir {out}", "--seeds must be ≥ 1"),
    ("world-flow-ablation-limit", "world flow-ablation --limit 0 --dir {out}", "--limit must be ≥ 1"),
    (
        "world-compress-study-budgets",
        "world compress-study --budgets 1/16,2 --dir {out}",
        "--budgets: budget '2' must be a ratio",
    ),
    (
        "world-compress-study-skills",
        "world compress-study --skills math,bogus --dir {out}",
        "--skills: unknown 'bogus'",
    ),
    ("world-compress-study-steps", "world compress-study --steps 0 --dir {out}", "--steps must be ≥ 1"),
    ("world-compress-study-limit", "world compress-study --limit 0 --dir {out}", "--limit must be ≥ 1"),
    (
        "world-route-study-seeds-text",
        "world route-study --seeds 1,x --json {out}",
        "--seeds must be comma-separated whole numbers, got '1,x'",
    ),
    (
        "world-route-study-seeds-negative",
        "world route-study --seeds 0,-1 --json {out}",
        "--seeds must be ≥ 0",
    ),
    (
        "world-route-study-seeds-empty",
        "world route-study --seeds , --json {out}",
        "--seeds needs at least one number",
    ),
    (
        "world-route-study-methods",
        "world route-study --methods softmax,bogus --json {out}",
        "--methods: unknown 'bogus'",
    ),
    (
        "world-route-study-top-k",
        "world route-study --top-k 9 --json {out}",
        "--top-k (experts per token, of --experts 8) must be ≤ 8, got 9",
    ),
    (
        "world-route-study-top-k-arrow",
        "world route-study --methods arrow --top-k 11 --json {out}",
        "--top-k (LoRAs per token, of the 10 world LoRAs)",
    ),
    ("world-route-study-threads", "world route-study --threads 0 --json {out}", "--threads must be ≥ 1"),
    ("world-route-study-experts", "world route-study --experts 0 --json {out}", "--experts must be ≥ 1"),
    ("world-route-study-steps", "world route-study --steps 0 --json {out}", "--steps must be ≥ 1"),
    ("world-route-study-samples", "world route-study --samples 0 --json {out}", "--samples must be ≥ 1"),
    ("world-route-study-limit", "world route-study --limit 0 --json {out}", "--limit must be ≥ 1"),
    (
        "world-route-study-merge-with",
        "world route-study --merge-with {missing} --json {out}",
        "--merge-with {missing}: no such file",
    ),
    (
        "world-route-study-dir",
        "world route-study --dir {missing} --json {out}",
        "--dir {missing}: no such folder",
    ),
    # serve loads its base through the same loader: dtype and device are checked there
    ("serve-dtype", "serve --base {base} --adapters {empty} --tokenizer {tok} --dtype int8", "--dtype"),
    ("serve-device", "serve --base {base} --adapters {empty} --tokenizer {tok} --device bogus", "--device"),
]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def paths(
    llama_dir: Path, llama_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The fixture paths the table's argv templates name."""
    root = tmp_path_factory.mktemp("fuzz_cli")
    tok = root / "tokenizer"
    word_tokenizer().save_pretrained(str(tok))
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": "w5 w6", "completion": "w7"}) + "\n" for _ in range(4)))
    latin1 = root / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    (root / "empty").mkdir()
    a, b = llama_adapters["plain"], llama_adapters["patterned"]
    recipe_nan = root / "nan.yaml"
    recipe_nan.write_text(
        f"merge_method: linear\nmodels:\n  - {{adapter: {a}, weight: .nan}}\n  - {{adapter: {b}}}\n"
    )
    recipe_seed = root / "seed.yaml"
    recipe_seed.write_text(
        f"merge_method: linear\nseed: -1\nmodels:\n  - {{adapter: {a}}}\n  - {{adapter: {b}}}\n"
    )
    (root / "broken.yaml").write_text("m: [a\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    return {
        "base": str(llama_dir),
        "tok": str(tok),
        "a": str(a),
        "b": str(b),
        "train": str(train),
        "latin1": str(latin1),
        "empty": str(root / "empty"),
        "missing": str(root / "does-not-exist"),
        "recipe_nan": str(recipe_nan),
        "recipe_seed": str(recipe_seed),
        "modes_broken": str(root / "broken.yaml"),
        "modes_list": str(root / "list.yaml"),
    }


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_value_is_one_line_and_exit_2(
    argv: str, expected: str, paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    values = {**paths, "out": str(out)}
    before = {k: _digest(Path(values[k])) for k in ("a", "b", "base")}
    code, _, err = run_cli([part.format(**values) for part in argv.split()], capsys)
    assert code == 2, err
    assert expected.format(**values) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert not out.exists()
    assert {k: _digest(Path(values[k])) for k in ("a", "b", "base")} == before


def test_inspect_goes_past_every_failure_and_lists_them(
    paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure lorafuse did not foresee (here a RuntimeError from the loader) stops nothing."""
    import lorafuse.adapters

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    crashing = tmp_path / "crashing"
    real = lorafuse.adapters.load_lora

    def load(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
        if Path(path) == crashing:
            raise RuntimeError("the loader crashed")
        return real(path, **kwargs)

    monkeypatch.setattr(lorafuse.adapters, "load_lora", load)
    code, out, err = run_cli(["inspect", paths["a"], str(crashing), str(broken), paths["b"]], capsys)
    assert code == 2
    assert out.count("rank(s)") == 2  # both readable adapters shown
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert f"{crashing}: unexpected RuntimeError: the loader crashed" in lines[0]
    assert str(broken) in lines[1]
    assert "Traceback" not in err


def test_max_new_tokens_is_capped_at_the_context_and_arrow_top_k_fits_two_loras(
    paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--max-new-tokens 100000`` → 252 = 256 (context) − 4 (prompt), with one notice line;
    the default ``--top-k`` (3) becomes 2 with two LoRAs instead of failing."""
    args = ["route", "generate", "--arrow", "--lora", paths["a"], "--lora", paths["b"]]
    args += ["--base", paths["base"], "--tokenizer", paths["tok"], "-p", PROMPT, "--max-new-tokens", "100000"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "max_new_tokens 100000 capped at 252 (the model's context of 256 tokens" in err
    answer = out.strip().split(" → ", 1)[1] if " → " in out else ""
    assert len(answer.split()) <= 252
    assert "Traceback" not in err


def test_generate_caps_max_new_tokens_for_a_fusion(
    paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fusion = tmp_path / "avg"
    args = ["fuse", "--method", "average", "--base", paths["base"], "--tokenizer", paths["tok"]]
    args += [
        "--lora",
        f"a={paths['a']}",
        "--lora",
        f"b={paths['b']}",
        "--train",
        paths["train"],
        "--out",
        str(fusion),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    args = ["generate", "--fusion", str(fusion), "--prompt", PROMPT, "--max-new-tokens", "100000"]
    code, out, err = run_cli([*args, "--tokenizer", paths["tok"]], capsys)
    assert code == 0, err
    assert "max_new_tokens 100000 capped at 252" in err
    assert len(out.split()) <= 252
