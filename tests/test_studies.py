"""The study registry and its commands: ``lorafuse world studies`` and ``lorafuse world study NAME``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from lorafuse.studies.registry import STUDIES, get_study

NAMES = ["composition", "compress", "flow-ablation", "merge", "recycle", "route"]


def test_the_registry_lists_the_studies() -> None:
    assert STUDIES.names() == NAMES
    for study in STUDIES.values():
        assert study.summary and study.claim and "arXiv" in study.paper, study.name
        assert "\n" not in study.summary
        assert callable(study.run) and callable(study.format)
    assert get_study("flow_ablation").name == "flow-ablation"  # the underscore spelling is an alias


def test_every_registered_study_has_a_command() -> None:
    from lorafuse.cli.studies import COMMANDS, OLD_NAMES

    assert sorted(COMMANDS) == NAMES
    assert set(OLD_NAMES.values()) <= set(NAMES)


def test_world_studies_prints_them(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["world", "studies"], capsys)
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert listed == NAMES
    for study in STUDIES.values():
        assert study.summary in out and study.claim in out
    code, out, _ = run_cli(["world", "studies", "--json"], capsys)
    assert code == 0
    assert [row["name"] for row in json.loads(out)] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_world_study_name_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["world", "study", name, "--help"], capsys)
    assert code == 0, err
    assert f"world study {name} [OPTIONS]" in " ".join(out.split())  # however the usage line wraps
    assert "--help" in out


def test_world_study_lists_the_studies_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["world", "study", "--help"], capsys)
    assert code == 0
    assert all(name in out for name in NAMES)


def test_unknown_study_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["world", "study", "bogus", "--limit", "3"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "error: unknown study 'bogus'; choose one of composition, compress, flow-ablation, merge, recycle, "
        "route"
    ]
    assert out == ""


def test_the_old_study_commands_still_run_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["world", "--help"], capsys)
    assert code == 0
    assert "study" in out and "studies" in out
    for old in ("merge-study", "flow-ablation", "compress-study", "route-study", "recycle-study"):
        assert old not in out
        code, help_text, err = run_cli(["world", old, "--help"], capsys)
        assert code == 0, err
        assert f"world {old} [OPTIONS]" in " ".join(help_text.split())


def test_world_study_runs_the_registered_study(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``world study merge`` and its old name ``world merge-study`` call the registered study's
    function with the same arguments and print its result with the registered formatter (the
    study itself runs in ``test_skillworld.py``; stubbed here, it would take minutes)."""
    import lorafuse.studies.merge

    calls = []
    canned = {"results": {"pool": {}}, "seconds": 0.0}

    def fake(root: Path, **kwargs: object) -> dict[str, object]:
        calls.append((Path(root), kwargs))
        return canned

    monkeypatch.setattr(lorafuse.studies.merge, "merge_study", fake)
    monkeypatch.setattr(lorafuse.studies.merge, "format_study", lambda result, matrix=None: "formatted merge")
    args = ["--profile", "tiny", "--dir", tiny_world, "--limit", "2", "--seed", "0"]
    code, out, err = run_cli(["world", "study", "merge", *args, "--json", tmp_path / "new.json"], capsys)
    assert code == 0, err
    assert out.strip() == "formatted merge"
    code, _, err = run_cli(["world", "merge-study", *args, "--json", tmp_path / "old.json"], capsys)
    assert code == 0, err
    assert calls == [(tiny_world, {"limit": 2, "seed": 0})] * 2
    assert json.loads((tmp_path / "new.json").read_text()) == canned
    assert json.loads((tmp_path / "old.json").read_text()) == canned
