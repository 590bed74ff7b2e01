"""The recycling study on the tiny world: the pool, its catalogue, the selections, the table, the CLI."""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from lorafuse.library import BY, connect, query
from lorafuse.studies.recycle import (
    FRESH,
    KINDS,
    METHODS,
    METRICS,
    RANDOM_WEIGHTS,
    StudyError,
    build_pool,
    cells,
    format_by_k,
    format_recycle_study,
    metrics_of,
    numbers,
    plot_recycle,
    pool_plan,
    quick_settings,
    recycle_study,
)

QUICK_AT_LEAST = {"world": 14, "subset": 4, "mixture": 3, "composite": 2, "irrelevant": 3}


def _main(args: list[Any]) -> tuple[int, str, str]:
    """``lorafuse ARGS`` through the real entry point, output captured without pytest's (function-
    scoped) capsys, for a module-scoped fixture: (exit status, stdout, stderr)."""
    import contextlib
    import io
    import sys

    from lorafuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, ["lorafuse", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_result(
    tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path, str]:
    """``world study recycle --quick`` on the tiny world, run once for the module: (JSON, folder, stdout)."""
    out = tmp_path_factory.mktemp("recycle")
    args = ["world", "study", "recycle", "--quick", "--profile", "tiny", "--dir", tiny_world]
    code, stdout, err = _main([*args, "--json", out / "r.json", "--md", out / "r.md", "--png", out / "r.png"])
    assert code == 0, err
    return json.loads((out / "r.json").read_text()), out, stdout


def test_the_pool_has_the_planned_kinds(tiny_world: Path) -> None:
    pool = build_pool(tiny_world, quick=True, progress=False)
    for kind in KINDS:
        assert pool["kinds"][kind] >= QUICK_AT_LEAST[kind], kind
    assert len(pool["loras"]) == len({lo["name"] for lo in pool["loras"]})
    full = pool_plan(quick=False)
    assert 14 + len(full) >= 50  # the full pool: the world's 14 and the trained ones
    assert {e["kind"] for e in full} == set(KINDS) - {"world"}


def test_the_catalogue_indexes_every_pool_lora(tiny_world: Path) -> None:
    pool = build_pool(tiny_world, quick=True, progress=False)
    with closing(connect(pool["catalogue"], create=False)) as con:
        ok = {row["name"] for row in query(con, status="ok")}
        broken = query(con, status="broken")
    assert broken == []
    assert ok == {lo["name"] for lo in pool["loras"]}


def test_each_rule_picks_k_distinct_loras(cli_result: tuple[dict[str, Any], Path, str]) -> None:
    result = cli_result[0]
    composite = result["composites"][0]
    pool_size = len(result["pool"]["loras"])
    assert set(result["selections"][composite]) == {"loss", "similarity", "norm", "random seed 0"}
    for run in result["runs"]:
        if run["rule"] == FRESH:
            continue
        assert len(set(run["loras"])) == len(run["loras"]) == run["k_used"]
        want = pool_size - 0 if run["k"] == "all" else int(run["k"])
        assert run["k_used"] == min(want, run["k_used"]) and run["k_used"] >= 2
        assert not any(name == f"comp-{composite}" for name in run["loras"])  # its own data: left out


def test_the_table_has_every_cell_and_the_controls(cli_result: tuple[dict[str, Any], Path, str]) -> None:
    result, out, stdout = cli_result
    table = cells(result)
    for rule in [*BY, RANDOM_WEIGHTS]:
        for k in ("2", "8", "all"):
            for method in METHODS:
                assert all(table[(rule, k, method)].values()), (rule, k, method)
    assert all(table[(FRESH, "—", FRESH)].values())
    text = format_recycle_study(result)
    assert metrics_of(result) == list(METRICS)  # a faithful composite: the final answer recorded too
    rows = 2 + (len(BY) + 1) * 3 * len(METHODS) + 1  # header, rule, cells, fresh
    assert text.count("\n| ") == len(METRICS) * rows
    for metric in METRICS:
        assert all(cells(result, metric)[(FRESH, "—", FRESH)].values())
    assert FRESH in text and RANDOM_WEIGHTS in text
    assert text in stdout
    md = (out / "r.md").read_text()
    assert md.strip().endswith(text) and md.startswith(format_by_k(result, "exact_match"))
    assert (out / "r.png").stat().st_size > 0
    for run in result["runs"]:
        assert 0 <= run["exact_match"] <= 100 and run["dev_loss"] > 0
    assert plot_recycle(result, out / "again.png").is_file()


def test_the_table_by_k_holds_the_mean_of_each_cell(cli_result: tuple[dict[str, Any], Path, str]) -> None:
    import statistics

    result = cli_result[0]
    text = format_by_k(result, "dev_loss")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == (len(BY) + 1) * len(METHODS) + 1
    table = cells(result, "dev_loss")
    norm_cat = next(r for r in rows if r.startswith("| norm | learned CAT |"))
    want = [
        statistics.mean(v for vs in table[("norm", k, "cat-weights")].values() for v in vs)
        for k in result["ks"]
    ]
    assert norm_cat.strip(" |").split(" | ")[2:] == [f"{v:.3f}" for v in want]


def test_the_table_by_k_gives_the_spread_over_seeds_of_the_composites_mean() -> None:
    def run(seed: int, composite: str, rule: str, k: Any, method: str, score: float) -> dict[str, Any]:
        return {
            "seed": seed,
            "composite": composite,
            "rule": rule,
            "k": k,
            "method": method,
            "exact_match": score,
        }

    runs = [run(0, "a", "loss", 2, "lora-flow", 10), run(0, "b", "loss", 2, "lora-flow", 20)]
    runs += [run(1, "a", "loss", 2, "lora-flow", 30), run(1, "b", "loss", 2, "lora-flow", 40)]
    runs += [
        run(s, c, FRESH, None, FRESH, v) for s, c, v in [(0, "a", 1), (0, "b", 3), (1, "a", 5), (1, "b", 7)]
    ]
    result = {"runs": runs, "rules": ["loss"], "ks": ["2"], "methods": ["lora-flow"], "seeds": [0, 1]}
    result |= {"composites": ["a", "b"], "complete": True}
    text = format_by_k(result)
    assert "| loss | LoRA-Flow | 25.0 ± 14.1 |" in text  # seed means 15 and 35
    assert f"| {FRESH} | — | 4.0 ± 2.8 |" in text  # seed means 2 and 6
    assert f"| {RANDOM_WEIGHTS} | LoRA-Flow | — |" in text
    assert "± std over seeds" in text.splitlines()[0]
    assert "| loss | LoRA-Flow | 25.0 (4) |" in format_by_k(result | {"complete": False})
    one_seed = result | {"runs": [r for r in runs if r["seed"] == 0], "seeds": [0]}
    assert "| loss | LoRA-Flow | 15.0 |" in format_by_k(one_seed)


def test_the_same_seed_gives_the_same_numbers(
    tiny_world: Path, cli_result: tuple[dict[str, Any], Path, str], tmp_path: Path
) -> None:
    """A rerun of part of the study (every method, the random rule, k = 2, the controls) repeats
    the CLI run's numbers and choices exactly."""
    settings = replace(quick_settings((0,)), rules=("random",), ks=(2,))
    again = recycle_study(tiny_world, settings, progress=False, runs_log=tmp_path / "runs.jsonl")
    assert again["resumed_runs"] == 0
    want = {row for row in numbers(cli_result[0])}
    got = numbers(again)
    assert got and all(row in want for row in got)


def test_an_unknown_option_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["world", "study", "recycle", "--quick", "--bogus"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--bogus" in err
    code, _, err = run_cli(["world", "recycle-study", "--ks", "2,zero"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --ks '2,zero': each k is a whole number >= 1 or 'all', not 'zero'"
    ]


def test_an_interrupted_study_resumes_with_the_same_numbers(
    tiny_world: Path, cli_result: tuple[dict[str, Any], Path, str], tmp_path: Path
) -> None:
    """The runs log of a study cut short (two runs kept, the third line half written) resumes:
    the kept runs are not made again and the rest repeat the CLI run's numbers."""
    settings = replace(quick_settings((0,)), rules=("norm",), ks=(2,), methods=("lorahub", "cat-weights"))
    log = tmp_path / "runs.jsonl"
    first = recycle_study(tiny_world, settings, progress=False, runs_log=log)
    lines = log.read_text().splitlines()
    runs = [i for i, line in enumerate(lines) if '"composite"' in line]
    assert len(runs) == len(first["runs"]) == 2 * 2 + 1  # norm and random weights × 2 methods, fresh
    log.write_text("\n".join(lines[: runs[2]]) + "\n" + lines[runs[2]][:25])  # cut in the third run
    again = recycle_study(tiny_world, settings, progress=False, runs_log=log)
    assert again["resumed_runs"] == 2
    assert numbers(again) == numbers(first)
    want = set(numbers(cli_result[0]))
    assert all(row in want for row in numbers(again))
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the cut line is gone
    assert recycle_study(tiny_world, settings, progress=False, runs_log=log)["resumed_runs"] == 5


def test_a_log_of_other_settings_is_refused(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = replace(quick_settings((0,)), rules=("norm",), ks=(2,), methods=("cat-weights",))
    log = tmp_path / "runs.jsonl"
    recycle_study(tiny_world, settings, progress=False, runs_log=log)
    with pytest.raises(StudyError, match="another world, pool or settings"):
        recycle_study(tiny_world, replace(settings, epochs=2.0), progress=False, runs_log=log)
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    header["header"]["fingerprint"] = "0" * 64  # a log made on another world
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    args = ["world", "study", "recycle", "--quick", "--profile", "tiny", "--dir", tiny_world, "--runs", log]
    code, _, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and str(log) in errors[0]
    fresh = recycle_study(
        tiny_world, replace(settings, epochs=2.0), progress=False, runs_log=log, resume=False
    )
    assert fresh["resumed_runs"] == 0 and len(fresh["runs"]) == 3


def test_logs_of_parallel_parts_merge_into_one(
    tiny_world: Path, cli_result: tuple[dict[str, Any], Path, str], tmp_path: Path
) -> None:
    """A study split over two processes by method (each with its own log) joins with --merge-runs:
    nothing is made again and the numbers are the CLI run's; a part of other settings is refused."""
    settings = replace(quick_settings((0,)), rules=("norm",), ks=(2,), methods=("lorahub", "cat-weights"))
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for part, method in zip(parts, ("lorahub", "cat-weights"), strict=True):
        recycle_study(tiny_world, replace(settings, methods=(method,)), progress=False, runs_log=part)
    joined = tmp_path / "joined.jsonl"
    whole = recycle_study(tiny_world, settings, progress=False, runs_log=joined, merge_runs=parts)
    assert whole["resumed_runs"] == len(whole["runs"]) == 2 * 2 + 1
    want = set(numbers(cli_result[0]))
    assert all(row in want for row in numbers(whole))
    again = recycle_study(tiny_world, settings, progress=False, runs_log=joined)
    assert again["resumed_runs"] == 5 and numbers(again) == numbers(whole)
    other = tmp_path / "other.jsonl"
    recycle_study(
        tiny_world, replace(settings, epochs=2.0, methods=("lorahub",)), progress=False, runs_log=other
    )
    with pytest.raises(StudyError, match=f"{other}: made on another world, pool or settings"):
        recycle_study(tiny_world, settings, progress=False, runs_log=joined, merge_runs=[other])


def test_world_parts_train_at_the_worlds_threads_and_restore_the_callers() -> None:
    """The pool and the world's LoRAs train at the profile's thread count (their bits must not
    follow a study's --threads), and the caller's count is back afterwards."""
    import torch

    from lorafuse.skillworld.build import PROFILES, world_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with world_threads(PROFILES["default"]):
            assert torch.get_num_threads() == PROFILES["default"].threads
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_report_of_a_study_under_way_trains_nothing_and_leaves_the_log_alone(
    tiny_world: Path, tmp_path: Path
) -> None:
    settings = replace(quick_settings((0,)), rules=("norm",), ks=(2,), methods=("cat-weights",))
    log = tmp_path / "runs.jsonl"
    part = recycle_study(tiny_world, settings, progress=False, runs_log=log)
    before = log.read_bytes()
    wider = replace(settings, methods=("cat-weights", "lorahub"))
    report = recycle_study(tiny_world, wider, progress=False, runs_log=log, make_runs=False)
    assert log.read_bytes() == before
    assert not report["complete"] and numbers(report) == numbers(part)
    assert "Under way" in format_recycle_study(report)
    assert recycle_study(tiny_world, settings, progress=False, runs_log=log, make_runs=False)["complete"]
    with pytest.raises(StudyError, match="no runs log here"):
        recycle_study(tiny_world, wider, progress=False, runs_log=tmp_path / "none.jsonl", make_runs=False)
    with pytest.raises(StudyError, match="drop --no-resume"):
        recycle_study(tiny_world, wider, progress=False, runs_log=log, make_runs=False, resume=False)
