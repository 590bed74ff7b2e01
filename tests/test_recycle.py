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
    RANDOM_WEIGHTS,
    build_pool,
    cells,
    format_recycle_study,
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
    assert text.count("\n| ") == 2 + (len(BY) + 1) * 3 * len(METHODS) + 1  # header, rule, cells, fresh
    assert FRESH in text and RANDOM_WEIGHTS in text
    assert text in stdout
    assert (out / "r.md").read_text().strip() == text
    assert (out / "r.png").stat().st_size > 0
    for run in result["runs"]:
        assert 0 <= run["exact_match"] <= 100 and run["dev_loss"] > 0
    assert plot_recycle(result, out / "again.png").is_file()


def test_the_same_seed_gives_the_same_numbers(
    tiny_world: Path, cli_result: tuple[dict[str, Any], Path, str]
) -> None:
    """A rerun of part of the study (every method, the random rule, k = 2, the controls) repeats
    the CLI run's numbers and choices exactly."""
    settings = replace(quick_settings((0,)), rules=("random",), ks=(2,))
    again = recycle_study(tiny_world, settings, progress=False)
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
