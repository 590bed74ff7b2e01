"""The README and the docs site: short README, examples that load, commands that exist, a full nav."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lorafuse import load_recipe
from lorafuse._data import read_rows
from lorafuse.cli import app
from lorafuse.merging.registry import MERGE_METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
PAGES = [README, *sorted(DOCS.rglob("*.md")), ROOT / "examples" / "README.md"]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(lorafuse [^`]+)`")


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details into docs/"


def test_readme_keeps_the_ci_test_command() -> None:
    """`.ci/run` runs the README's test command."""
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipes_parse(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.merge_method in MERGE_METHODS
    assert recipe.merge_method == path.stem.removesuffix("-peft").removesuffix("-mergekit")


def test_every_merge_method_has_an_example_recipe() -> None:
    assert {load_recipe(p).merge_method for p in RECIPES} == set(MERGE_METHODS)


def test_example_fusion_dataset_loads() -> None:
    train = read_rows(ROOT / "examples" / "fusion" / "train.jsonl")
    dev = read_rows(ROOT / "examples" / "fusion" / "dev.jsonl")
    assert len(train) == 200 and len(dev) == 50
    for row in [*train, *dev]:
        assert set(row) == {"prompt", "completion"} and row["prompt"] and row["completion"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in dev}


def _shown_commands() -> dict[tuple[str, ...], str]:
    """Every ``lorafuse ...`` line in a code block (and inline code) of the README and docs."""
    found: dict[tuple[str, ...], str] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
        lines += INLINE.findall(text)
        for line in lines:
            line = line.strip().removeprefix("$ ")
            if line == "lorafuse" or line.startswith("lorafuse "):
                found.setdefault(tuple(line.split()[1:]), f"{page.relative_to(ROOT)}: {line}")
    return found


def _command_paths(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The command paths ``words`` names (``world build|eval`` names two); [] if none exists."""
    command = typer.main.get_command(app)  # typer's own click: groups are told by their .commands
    path: list[str] = []
    for word in words:
        if word.startswith("-") or not hasattr(command, "commands") or word.isupper() or word == "...":
            break
        names = word.split("|")
        if not all(name in command.commands for name in names):
            return []
        if len(names) > 1:
            return [(*path, name) for name in names]
        path.append(word)
        command = command.commands[word]
    placeholder = not words or words[0].startswith("-") or words[0].isupper()  # lorafuse --help, COMMAND
    return [tuple(path)] if path or placeholder else []


def test_every_command_shown_exists() -> None:
    shown = _shown_commands()
    assert len(shown) > 30  # the pages show many commands; the parser must find them
    assert _command_paths(("no-such-verb",)) == [] and _command_paths(("world", "no-such")) == []
    runner = CliRunner()
    checked: set[tuple[str, ...]] = set()
    for words, where in shown.items():
        paths = _command_paths(words)
        assert paths, f"{where}: no such lorafuse command"
        for path in paths:
            if path in checked:
                continue
            result = runner.invoke(app, [*path, "--help"])
            assert result.exit_code == 0, f"{where}: lorafuse {' '.join(path)} --help failed: {result.output}"
            checked.add(path)


def _nav_pages(items: object) -> set[str]:
    if isinstance(items, str):
        return {items}
    if isinstance(items, list):
        return set().union(*(_nav_pages(i) for i in items))
    if isinstance(items, dict):
        return set().union(*(_nav_pages(v) for v in items.values()))
    return set()


def test_nav_lists_every_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    excluded = [line.strip() for line in config.get("exclude_docs", "").splitlines() if line.strip()]
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    pages = {p for p in pages if not any(fnmatch.fnmatch("/" + p, pattern) for pattern in excluded)}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install 'lorafuse[docs]')",
)
def test_docs_build_strict(tmp_path: Path) -> None:
    """`make docs`: any warning (a broken link, a page outside the nav, a missing snippet) fails."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "site" / "results" / "merging" / "index.html").is_file()
