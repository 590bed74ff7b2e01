"""`lorafuse fuse`, `generate`, `explain` and `demo` on the tiny skill world, end to end.

The explain page is opened in headless Chromium (Debian's package, installed by `make test`);
the test checks that the script ran and coloured every token with its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from lorafuse.cli import app
from lorafuse.eval import generate as run_generate
from lorafuse.fusion import load_fusion
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import load_world

runner = CliRunner()


@pytest.fixture(scope="module")
def fusion_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fusions") / "flow"
    data = tiny_world / "data" / "math_zorb"
    args = [
        "fuse",
        "--base",
        str(tiny_world / "base"),
        "--lora",
        f"lang={tiny_world / 'loras' / 'lang_zorb'}",
        "--lora",
        f"math={tiny_world / 'loras' / 'math'}",
        "--train",
        str(data / "train.jsonl"),
        "--dev",
        str(data / "dev.jsonl"),
        "--epochs",
        "0.2",
        "--lr",
        "0.05",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gate parameters: 132 = 2 gates × (32 hidden × 2 LoRAs + 2 bias)" in result.output
    return out


def test_fuse_writes_a_fusion_that_generate_uses(fusion_dir: Path, tiny_world: Path) -> None:
    meta = json.loads((fusion_dir / "fusion.json").read_text())
    assert meta["method"] == "lora-flow" and meta["num_params"] == 2 * 32 * 2 + 2 * 2
    assert [x["name"] for x in meta["loras"]] == ["lang", "math"]
    assert all(len(x["sha256"]["adapter_model.safetensors"]) == 64 for x in meta["loras"])
    prompt = read_jsonl(tiny_world / "data" / "math_zorb" / "test.jsonl")[0]["prompt"]
    result = runner.invoke(
        app, ["generate", "--fusion", str(fusion_dir), "--prompt", prompt, "--max-new-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    tokenizer, model = load_world(tiny_world)
    load_fusion(fusion_dir).attach(model)
    expected = run_generate(model, tokenizer, [prompt], max_new_tokens=8)[0]
    assert result.stdout.splitlines() == [expected]


def test_fuse_rejects_bad_input(tiny_world: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    args = [
        "fuse",
        "--base",
        str(tiny_world / "base"),
        "--lora",
        f"m={tiny_world / 'loras' / 'math'}",
        "--train",
        str(bad),
        "--out",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and 'string fields "prompt" and "completion"' in result.output
    assert not (tmp_path / "out").exists()
    args[4] = "m"
    assert "takes NAME=DIR" in runner.invoke(app, args).output


def test_fuse_lorahub_budget_sets_the_number_of_evaluations(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_world / "data" / "math_zorb"
    args = ["fuse", "--base", str(tiny_world / "base"), "--method", "lorahub", "--budget", "3"]
    for name in ("lang_zorb", "math", "copy"):
        args += ["--lora", f"{name}={tiny_world / 'loras' / name}"]
    args += ["--train", str(data / "train.jsonl"), "--out", str(tmp_path / "hub")]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "lorahub: 3 weights searched with 3 evaluations; a budget of 5 or more" in err
    info = json.loads((tmp_path / "hub" / "fusion.json").read_text())["info"]
    assert info["config"]["budget"] == 3 and len(info["objective"]) == 3
    args[args.index("--budget") + 1] = "0"
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--budget" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_explain_page_renders_tokens_and_weights_in_chromium(
    fusion_dir: Path, tiny_world: Path, tmp_path: Path
) -> None:
    prompt = read_jsonl(tiny_world / "data" / "math_zorb" / "test.jsonl")[0]["prompt"]
    page = tmp_path / "page.html"
    args = [
        "explain",
        "--fusion",
        str(fusion_dir),
        "--prompt",
        prompt,
        "--out",
        str(page),
        "--max-new-tokens",
        "6",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    png = tmp_path / "page_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    data = json.loads(html.split('id="weights">', 1)[1].split("</script>", 1)[0])
    weights = torch.tensor(data["weights"])  # (layers, T, k)
    assert weights.shape[0] == 2 and weights.shape[2] == 2 and weights.shape[1] == len(data["tokens"])
    assert data["tokens"][0] == "<s>" and prompt.split()[0] in data["tokens"]
    browser = _chromium()
    if browser is None:
        if os.environ.get("LORAFUSE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium not installed (make test installs it)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-painted="yes"' in dom  # the script ran
    shown = dom.count("data-shown=")
    assert shown == len(data["tokens"])  # every token got its weight
    assert dom.count("background: rgba(") == len(data["tokens"])
    assert "math weight, mean over layers" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1000,700", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 1000


def test_explain_refuses_a_static_fusion(tiny_world: Path, tmp_path: Path) -> None:
    data = tiny_world / "data" / "math_zorb"
    out = tmp_path / "avg"
    args = [
        "fuse",
        "--base",
        str(tiny_world / "base"),
        "--lora",
        f"lang={tiny_world / 'loras' / 'lang_zorb'}",
        "--lora",
        f"math={tiny_world / 'loras' / 'math'}",
        "--train",
        str(data / "train.jsonl"),
        "--method",
        "average",
        "--out",
        str(out),
    ]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(
        app, ["explain", "--fusion", str(out), "--prompt", "a b", "--out", str(tmp_path / "p.html")]
    )
    assert result.exit_code == 2 and "needs a lora-flow fusion" in result.output


def test_demo_runs_the_study_on_the_tiny_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFUSE_HOME", str(tmp_path / "home"))
    report = tmp_path / "report"
    args = [
        "demo",
        "--profile",
        "tiny",
        "--quick",
        "--composites",
        "math_zorb,math_worded_zorb",
        "--epochs",
        "0.1",
        "--limit",
        "4",
        "--report",
        str(report),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "PEFT" in result.output  # the bank check ran first
    study = json.loads((report / "study.json").read_text())
    assert set(study["results"]["math_zorb"]) == set(study["rows"]) and len(study["rows"]) == 11
    assert all(len(v) == 1 for v in study["results"]["math_zorb"].values())
    faithful = study["details"]["math_worded_zorb"]
    assert faithful["loras"] == ["chat_zorb", "math_worded"]
    assert set(faithful["final_answer_match"]) == set(study["rows"])  # MGSM's metric beside
    assert "final_answer_match" not in study["details"]["math_zorb"]
    chosen = faithful["settings"]["LoRA-Flow"]  # the paper's protocol: lr / batch chosen on dev
    assert (chosen["lr"], chosen["batch_size"]) in [(1e-3, 4), (1e-4, 16)] and len(chosen["dev_loss"]) == 2
    assert set(faithful["settings"]) == {
        "learned CAT",
        "LoRA-Flow",
        "fresh LoRA (control)",
        "LoRA-Flow, random LoRAs (control)",
    }
    gates = faithful["token_gates"]
    assert set(gates["mean_weights"]) == {"language words", "digits and operators"}
    assert all(n > 0 for n in gates["tokens"].values())
    assert all(len(w) == 2 for rows in gates["mean_weights"].values() for w in rows)  # (layers, k=2)
    assert "| LoRA-Flow |" in (report / "study.md").read_text()
    assert (report / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert f"report: {report}" in result.output
    page = (report / "study.html").read_text()
    assert page.count("<table>") == 3 and page.count("data:image/png;base64,") == 3  # nothing fetched
    browser = _chromium()
    if browser is None:
        if os.environ.get("LORAFUSE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium not installed (make test installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", (report / "study.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-images="3"' in dom and 'data-images-loaded="3"' in dom  # every figure decoded
    assert dom.count("<table>") == 3 and "LoRA-Flow" in dom and "settings chosen on the dev set" in dom
