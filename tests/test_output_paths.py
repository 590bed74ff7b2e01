"""Nothing lost: no writer replaces, deletes or writes inside one of its inputs; replaces are safe.

One table of hostile output paths drives the CLI (through the real entry point) and the library:
each case must end with one clear line naming the output and the input (status 2 on the CLI),
and the whole workspace, every file hashed with SHA-256, must be exactly as before. Further
tables simulate what a killed writer leaves on disk and check the next write repairs it, and
check that outputs get the mode the umask asks for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import run_cli
from lorafuse._io import (
    atomic_output_dir,
    current_umask,
    recover_leftovers,
    write_safetensors,
    write_text_atomic,
)
from lorafuse.adapters import load_lora, save_lora
from lorafuse.compress import compress_checkpoint, decompress
from lorafuse.errors import OutputExistsError, OutputPathError
from lorafuse.fusion import save_fusion
from lorafuse.fusion.artefact import Fusion, adapter_hashes
from lorafuse.route import Mixture, MixtureConfig
from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

# --- The workspace ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/ and ft/ (two tiny Llamas of one shape), lib/a, lib/b and solo/ (PEFT LoRAs of base),
    comp/ (ft − base compressed), data/train.jsonl and fus/ (a static fusion of lib/a and lib/b)."""
    root = tmp_path_factory.mktemp("assets")
    base = tiny_llama(0)
    save_model(base, root / "base")
    save_model(tiny_llama(1), root / "ft")
    for seed, name in enumerate(("lib/a", "lib/b", "solo"), 1):
        random_peft_adapter(base, root / name, seed=seed, r=2, lora_alpha=4)
    compress_checkpoint(
        root / "base", root / "ft", root / "comp", method="low-rank", budget="1/4", progress=False
    )
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    loras = {"a": root / "lib/a", "b": root / "lib/b"}
    fusion = Fusion(
        "static",
        ["a", "b"],
        {"weights": torch.tensor([0.5, 0.5])},
        lora_paths={n: str(p) for n, p in loras.items()},
        lora_hashes={n: adapter_hashes(p) for n, p in loras.items()},
    )
    save_fusion(fusion, root / "fus")
    return root


@pytest.fixture()
def w(assets: Path, tmp_path: Path) -> Path:
    """A private copy of the assets for one test."""
    return Path(shutil.copytree(assets, tmp_path / "w", symlinks=True))


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: SHA-256 of files, targets of symlinks, ``dir`` for folders."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --- One table: outputs that are, contain or lie inside an input --------------------------------


def _link(name: str, target: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).symlink_to(w / target)

    return make


def _recipe(w: Path) -> None:
    (w / "recipes").mkdir()
    (w / "recipes" / "r.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - adapter: {w / 'lib/a'}\n  - adapter: {w / 'lib/b'}\n"
        f"out: {w / 'recipes'}\n"
    )


def _mixture_over_base(w: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w / "base").eval()
    mixture = Mixture.create(model, MixtureConfig(experts=2, top_k=1, rank=2), base_model=str(w / "base"))
    mixture.save(w / "base")


def _compress(out: str, *more: str) -> Callable[[Path], list[object]]:
    return lambda w: ["compress", "--base", w / "base", "--finetuned", w / "ft", "--method", "low-rank",
                      "--budget", "1/4", "--out", w / out, *more]  # fmt: skip


def _decompress(out: str) -> Callable[[Path], list[object]]:
    return lambda w: ["decompress", w / "comp", "--base", w / "base", "--out", w / out, "--force"]


def _merge(out: str, *adapters: str, force: bool = True) -> Callable[[Path], list[object]]:
    flags = ["--force"] if force else []
    return lambda w: ["merge", "-m", "linear", "--out", w / out, *flags, *(w / a for a in adapters)]


Action = Callable[[Path], "list[object] | Callable[[], object]"]

# (id, extra setup, the CLI arguments or a library call, the output and the input the message names)
CASES: list[tuple[str, Callable[[Path], None] | None, Action, str, str]] = [
    ("compress-out-is-finetuned", None, _compress("ft", "--force"), "ft", "ft"),
    ("compress-out-is-base", None, _compress("base", "--force"), "base", "base"),
    ("compress-out-inside-finetuned", None, _compress("ft/delta"), "ft/delta", "ft"),
    ("compress-out-contains-inputs", None, _compress(".", "--force"), ".", "base"),
    ("decompress-out-is-base", None, _decompress("base"), "base", "base"),
    ("decompress-out-is-compressed", None, _decompress("comp"), "comp", "comp"),
    ("merge-out-contains-inputs", None, _merge("lib", "lib/a", "lib/b"), "lib", "lib/a"),
    ("merge-out-inside-input", None, _merge("lib/a/merged", "lib/a", "lib/b", force=False),
     "lib/a/merged", "lib/a"),
    ("merge-out-dotdot-is-input", None, _merge("lib/a/../b", "lib/a", "lib/b"), "lib/a/../b", "lib/b"),
    ("merge-out-symlink-to-input", _link("link", "lib/a"), _merge("link", "lib/a", "lib/b"), "link", "lib/a"),
    ("merge-input-symlink-into-out", _link("alias", "lib/b"), _merge("lib", "alias", "solo"), "lib", "alias"),
    ("merge-input-symlink-inside-out", _link("links/a", "lib/a"), _merge("links", "links/a", "solo"),
     "links", "links/a"),
    ("merge-recipe-inside-out", _recipe, lambda w: ["merge", w / "recipes" / "r.yaml", "--force"],
     "recipes", "recipes/r.yaml"),
    ("fuse-out-contains-lora", None,
     lambda w: ["fuse", "--base", w / "base", "--lora", f"a={w / 'lib/a'}", "--train", w / "data/train.jsonl",
                "--out", w / "lib", "--force"], "lib", "lib/a"),
    ("fuse-out-contains-train-data", None,
     lambda w: ["fuse", "--base", w / "base", "--lora", f"a={w / 'lib/a'}", "--train", w / "data/train.jsonl",
                "--out", w / "data", "--force"], "data", "data/train.jsonl"),
    ("train-lora-out-contains-train-data", None,
     lambda w: ["train-lora", "--base", w / "base", "--train", w / "data/train.jsonl", "--out", w / "data",
                "--force"], "data", "data/train.jsonl"),
    ("route-train-out-is-base", None,
     lambda w: ["route", "train", "--base", w / "base", "--data", w / "data/train.jsonl", "--out", w / "base",
                "--force"], "base", "base"),
    ("route-encoder-out-inside-lora", None,
     lambda w: ["route", "train-encoder", "--base", w / "base", "--lora", f"a={w / 'lib/a'}", "--data",
                w / "data/train.jsonl", "--out", w / "lib/a/enc"], "lib/a/enc", "lib/a"),
    ("explain-out-inside-fusion", None,
     lambda w: ["explain", "--fusion", w / "fus", "--prompt", "a", "--out", w / "fus/fusion.json"],
     "fus/fusion.json", "fus"),
    ("api-save-lora-around-input", None,
     lambda w: lambda: save_lora(load_lora(w / "lib/a"), w / "lib", inputs=[w / "lib/a"]), "lib", "lib/a"),
    ("api-compress-out-is-finetuned", None,
     lambda w: lambda: compress_checkpoint(w / "base", w / "ft", w / "ft", method="low-rank", budget="1/4",
                                           overwrite=True, progress=False), "ft", "ft"),
    ("api-decompress-out-is-base", None,
     lambda w: lambda: decompress(w / "comp", w / "base", w / "base", overwrite=True, progress=False),
     "base", "base"),
    ("api-fusion-around-its-loras", None,
     lambda w: lambda: save_fusion(Fusion("static", ["a"], {"weights": torch.ones(1)},
                                          lora_paths={"a": str(w / "lib/a")},
                                          lora_hashes={"a": adapter_hashes(w / "lib/a")}), w / "lib"),
     "lib", "lib/a"),
    ("api-mixture-over-its-base", None, lambda w: lambda: _mixture_over_base(w), "base", "base"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "action", "out", "source"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_output_never_touches_an_input(
    w: Path,
    setup: Callable[[Path], None] | None,
    action: Action,
    out: str,
    source: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if setup is not None:
        setup(w)
    before = snapshot(w)
    todo = action(w)
    if callable(todo):
        with pytest.raises(OutputPathError) as caught:
            todo()
        message = str(caught.value)
    else:
        code, _, err = run_cli(todo, capsys)
        assert code == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: "), err
        message = err
    shown_out = str(w) if out == "." else str(w / out)
    assert shown_out in message and str(w / source) in message, message
    assert snapshot(w) == before, "nothing written, every input unchanged"


# --- What a killed writer leaves behind --------------------------------------------------------


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path: Path, text: str) -> None:
    path.mkdir(parents=True)
    (path / "content.txt").write_text(text)


# (id, entries beside ``out`` by name -> content or None for "absent", expected afterwards, log words)
LEFTOVERS: list[tuple[str, dict[str, str | None], dict[str, str | None], str]] = [
    ("killed-between-renames", {"out": None, ".out.old-{dead}-1a2b3c4d": "previous"},
     {"out": "previous", ".out.old-{dead}-1a2b3c4d": None}, "restored"),
    ("killed-between-renames-old-name", {"out": None, ".out.old-{dead}": "previous"},
     {"out": "previous", ".out.old-{dead}": None}, "restored"),
    ("killed-before-deleting-old", {"out": "new", ".out.old-{dead}-1a2b3c4d": "previous"},
     {"out": "new", ".out.old-{dead}-1a2b3c4d": None}, "removed"),
    ("killed-while-writing", {"out": "previous", ".out.tmp-{dead}-abcd1234": "half"},
     {"out": "previous", ".out.tmp-{dead}-abcd1234": None}, "unfinished"),
    ("killed-between-renames-with-tmp", {"out": None, ".out.old-{dead}-1a2b3c4d": "previous",
                                         ".out.tmp-{dead}-abcd1234": "new"},
     {"out": "previous", ".out.old-{dead}-1a2b3c4d": None, ".out.tmp-{dead}-abcd1234": None}, "restored"),
    ("writer-still-running", {"out": None, ".out.old-{me}-1a2b3c4d": "old", ".out.tmp-{me}-abcd1234": "new"},
     {"out": None, ".out.old-{me}-1a2b3c4d": "old", ".out.tmp-{me}-abcd1234": "new"}, ""),
    ("other-outputs-untouched", {"out": "x", ".outer.old-{dead}": "keep", ".out.old-{dead}.bak": "keep"},
     {"out": "x", ".outer.old-{dead}": "keep", ".out.old-{dead}.bak": "keep"}, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "expected", "logged"), [c[1:] for c in LEFTOVERS], ids=[c[0] for c in LEFTOVERS]
)
def test_leftovers_are_repaired(
    tmp_path: Path,
    dead_pid: int,
    state: dict[str, str | None],
    expected: dict[str, str | None],
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def name(template: str) -> str:
        return template.format(dead=dead_pid, me=os.getpid())

    for entry, text in state.items():
        if text is not None:
            _folder(tmp_path / name(entry), text)
    with caplog.at_level(logging.WARNING, logger="lorafuse"):
        recover_leftovers(tmp_path / "out")
    for entry, text in expected.items():
        path = tmp_path / name(entry)
        assert (path / "content.txt").read_text() == text if text is not None else not path.exists(), entry
    assert {p.name for p in tmp_path.iterdir()} == {name(e) for e, t in expected.items() if t is not None}
    if logged:
        assert logged in caplog.text and str(tmp_path / "out") in caplog.text
    else:
        assert not caplog.records


def test_kill_between_the_two_renames_loses_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real SIGKILL right after the old output was renamed aside: the next write restores it."""
    out = tmp_path / "out"
    _folder(out, "previous")
    src = Path(lorafuse.__file__).parents[1]
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from lorafuse import _io\n"
        "real = os.replace\n"
        "def replace(a, b):\n"
        "    real(a, b)\n"
        "    if '.old-' in os.path.basename(b):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        f"with _io.atomic_output_dir({str(out)!r}) as tmp:\n"
        "    (tmp / 'content.txt').write_text('new')\n"
    )
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -signal.SIGKILL
    assert not out.exists(), "the crash state: nothing under the final name"
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".out.old", ".out.tmp"]
    with (
        caplog.at_level(logging.WARNING, logger="lorafuse"),
        pytest.raises(OutputExistsError, match="exists"),
        atomic_output_dir(out, overwrite=False),
    ):
        pass
    assert (out / "content.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert "restored" in caplog.text and "unfinished" in caplog.text


def test_failed_rename_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _folder(out, "previous")
    real = os.replace

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if Path(b) == out and ".tmp-" in Path(a).name:
            raise OSError("disk on fire")
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk on fire"), atomic_output_dir(out) as tmp:
        (tmp / "content.txt").write_text("new")
    assert (out / "content.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_next_cli_run_recovers(w: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``merge`` into an output whose replace was killed: the old output comes back, and counts."""
    out = w / "merged"
    code, _, err = run_cli(["merge", "-m", "linear", "--out", out, w / "lib/a", w / "lib/b"], capsys)
    assert code == 0, err
    before = snapshot(out)
    out.rename(w / f".merged.old-{dead_pid}-00ff00ff")
    code, _, err = run_cli(["merge", "-m", "linear", "--out", out, w / "lib/a", w / "lib/b"], capsys)
    assert code == 2 and "exists; pass --force" in err, err
    assert snapshot(out) == before
    assert not [p for p in w.iterdir() if p.name.startswith(".merged")]


# --- Modes from the umask, existing outputs that are not ours -----------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_outputs_honour_the_umask(w: Path, umask: int) -> None:
    saved = os.umask(umask)
    try:
        assert current_umask() == umask
        out = save_lora(load_lora(w / "lib/a"), w / "copy")
        page = write_text_atomic(w / "page.txt", "text")
        write_safetensors({"x": torch.ones(1)}, w / "state.safetensors")  # as checkpoints are written
    finally:
        os.umask(saved)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for file in (*out.iterdir(), page, w / "state.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


EXISTING: list[tuple[str, Callable[[Path], list[object]], str]] = [
    ("route-train-needs-force",
     lambda w: ["route", "train", "--base", w / "base", "--data", w / "data/train.jsonl",
                "--out", w / "solo"], "exists; pass --force"),
    ("world-build-refuses-a-folder-that-is-no-world",
     lambda w: ["world", "build", "--profile", "tiny", "--dir", w / "lib"], "is not a skill world"),
    ("merge-out-is-a-file", _merge("data/train.jsonl", "lib/a", "lib/b"), "is not a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in EXISTING], ids=[c[0] for c in EXISTING])
def test_existing_outputs_are_kept(
    w: Path, args: Callable[[Path], list[object]], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(w)
    code, _, err = run_cli(args(w), capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert snapshot(w) == before
