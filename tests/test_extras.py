"""Optional extras: a missing package is one clear error naming the extra, and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafuse._extras import MissingExtraError, require
from lorafuse.errors import LorafuseError

SRC = Path(__file__).resolve().parents[1] / "src"


def test_require_returns_the_module() -> None:
    import json

    assert require("json", "serve", "anything") is json


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingExtraError) as info:
        require("fastapi", "serve", "lorafuse serve")
    assert str(info.value) == "lorafuse serve needs FastAPI: pip install 'lorafuse[serve]'"
    assert isinstance(info.value, LorafuseError) and isinstance(info.value, ImportError)


def _forget_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "lorafuse.serve" or n.startswith("lorafuse.serve.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize(
    ("module", "shown"),
    [("fastapi", "FastAPI"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")],
)
def test_serve_package_without_its_extra(monkeypatch: pytest.MonkeyPatch, module: str, shown: str) -> None:
    _forget_serve(monkeypatch)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        MissingExtraError, match=rf"^lorafuse serve needs {shown}: pip install 'lorafuse\[serve\]'$"
    ):
        import lorafuse.serve  # noqa: F401


def test_serve_command_without_fastapi_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli

    _forget_serve(monkeypatch)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    (tmp_path / "base").mkdir()
    (tmp_path / "adapters").mkdir()
    code, _, err = run_cli(
        ["serve", "--base", tmp_path / "base", "--adapters", tmp_path / "adapters"], capsys
    )
    assert code == 2
    assert err.strip() == "error: lorafuse serve needs FastAPI: pip install 'lorafuse[serve]'"


def test_lorahub_without_nevergrad(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafuse.fusion.lorahub import lorahub_search

    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(MissingExtraError, match=r"needs nevergrad: pip install 'lorafuse\[study\]'$"):
        lorahub_search(lambda w: float(w.sum()), 2, progress=False)


def test_plots_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lorafuse.fusion.explain import Explanation, heatmap_png

    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    explanation = Explanation(["a", "b"], 1, torch.zeros(1, 2, 2), ["x", "y"], "b")
    with pytest.raises(MissingExtraError, match=r"needs matplotlib: pip install 'lorafuse\[study\]'$"):
        heatmap_png(explanation, tmp_path / "h.png")


def test_import_lorafuse_needs_no_extra() -> None:
    """``import lorafuse`` and the CLI's ``--help`` work with every optional package unimportable."""
    blocked = ["fastapi", "uvicorn", "prometheus_client", "starlette", "matplotlib", "nevergrad", "mkdocs"]
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import lorafuse, lorafuse.cli\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(lorafuse.cli.app, ['serve', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
