"""The command line: help texts, inspect (text and JSON), errors, and the demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafuse import load_lora
from lorafuse.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_root_help_lists_verbs() -> None:
    output = runner.invoke(app, ["--help"]).output
    assert "inspect" in output and "demo" in output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("lorafuse ")


def test_inspect_text(llama_adapters: dict[str, Path]) -> None:
    result = runner.invoke(app, ["inspect", str(llama_adapters["patterned"])])
    assert result.exit_code == 0, result.output
    assert "rank(s)         2, 6, 8" in result.output
    assert "q_proj" in result.output and "‖ΔW‖_F" in result.output


def test_inspect_json_matches_dense_norms(llama_adapters: dict[str, Path]) -> None:
    paths = [str(llama_adapters["plain"]), str(llama_adapters["rslora_qv"])]
    result = runner.invoke(app, ["inspect", "--json", *paths])
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.output)
    assert [s["ranks"] for s in summaries] == [[4], [8]]
    assert summaries[0]["alphas"] == [8.0] and summaries[0]["scales"] == [2.0]
    assert summaries[1]["target_modules"] == ["q_proj", "v_proj"]
    lora = load_lora(llama_adapters["plain"])
    assert summaries[0]["num_params"] == lora.num_params
    q_norms = [m.delta().norm().item() for p, m in lora.modules.items() if p.endswith("q_proj")]
    row = summaries[0]["delta_norms"]["q_proj"]
    assert row["modules"] == 2
    assert row["max"] == pytest.approx(max(q_norms), rel=1e-5)
    assert row["mean"] == pytest.approx(sum(q_norms) / 2, rel=1e-5)


def test_inspect_bad_adapter_exits_2_and_shows_the_others(
    llama_adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = Path(shutil.copytree(llama_adapters["plain"], tmp_path / "broken"))
    (broken / "adapter_model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["inspect", str(broken), str(llama_adapters["plain"])])
    assert result.exit_code == 2
    assert "adapter_model.safetensors: the file is empty" in result.output
    assert "rank(s)" in result.output


def test_bank_check_passes(tmp_path: Path) -> None:
    from lorafuse.demo import run_demo

    data = run_demo(tmp_path / "d", 0)
    assert data["ok"] and len(data["checks"]) == 4
