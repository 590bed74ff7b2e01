"""``lorafuse serve --engine vllm`` in front of a real vLLM (CPU build) server.

Marker ``vllm``: skipped unless the vLLM virtual environment exists (``$LORAFUSE_VLLM_PYTHON``,
default ``/work/.venv-vllm/bin/python``); ``LORAFUSE_REQUIRE_VLLM=1`` makes its absence a
failure. vLLM's CPU attention needs a head size of at least 32: the skill world's ``tiny``
profile has one head of 32 (hidden 32), so its base is served as it is. vLLM starts in
85–120 s; the test then asks the same greedy requests of vLLM behind lorafuse as the built-in
engine's single-request reference answers (PEFT adapters, weighted compositions, a static
fusion, a low-rank compressed delta) and wants the same texts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.studies.serving import reference, serving_folder

pytestmark = pytest.mark.vllm

VLLM_PYTHON = Path(os.environ.get("LORAFUSE_VLLM_PYTHON", "/work/.venv-vllm/bin/python"))
BASE = "world"
MAX_RANK = 64
STARTUP_S = 400


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(url: str, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not answer /health in {STARTUP_S} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def adapters(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not VLLM_PYTHON.exists():
        message = f"no vLLM virtual environment at {VLLM_PYTHON} (make venv-vllm)"
        if os.environ.get("LORAFUSE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("vllm-adapters") / "adapters"
    serving_folder(tiny_world, folder)
    return folder


def _reference(world: Path, folder: Path, reqs: list[dict[str, Any]]) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()
    return [reference(model, tokenizer, folder, r, BASE) for r in reqs]


def _prompts(world: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in (world / "data" / "math" / "test.jsonl").open()][:2]


@pytest.fixture()
def vllm(tiny_world: Path, adapters: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    work, folder = tmp_path, adapters
    port, log = _port(), work / "vllm.log"
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PYTHONPATH", None)  # vLLM's own environment, not lorafuse's
    command = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_world / "base"),
        "--tokenizer",
        str(tiny_world / "tokenizer"),
        "--served-model-name",
        "vbase",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.3",
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_RANK),
        "--max-loras",
        "4",
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process, log, "vLLM")
        startup = time.monotonic() - started
        print(f"\nvLLM started in {startup:.0f} s")
        yield {"url": url, "folder": folder, "world": tiny_world, "work": work, "startup_s": startup}
    finally:
        _stop(process)


@pytest.fixture()
def lorafuse(vllm: dict[str, Any]) -> Iterator[str]:
    """``lorafuse serve --engine vllm`` as a user starts it."""
    port, log = _port(), vllm["work"] / "lorafuse.log"
    world = vllm["world"]
    command = [
        sys.executable,
        "-m",
        "lorafuse",
        "serve",
        "--base",
        str(world / "base"),
        "--tokenizer",
        str(world / "tokenizer"),
        "--adapters",
        str(vllm["folder"]),
        "--model-name",
        BASE,
        "--port",
        str(port),
        "--engine",
        "vllm",
        "--vllm-url",
        vllm["url"],
        "--vllm-max-lora-rank",
        str(MAX_RANK),
        "--vllm-cache",
        str(vllm["work"] / "cache"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process, log, "lorafuse serve --engine vllm")
        yield url
    finally:
        _stop(process)


SPECS: list[dict[str, Any]] = [
    {"model": BASE},
    {"model": "math"},
    {"model": "lang_zorb"},
    {"model": "rand2"},
    {"model": BASE, "compose": {"rand0": 0.7, "rand3": 0.4}},
    {"model": BASE, "compose": {"math": 1.0, "lang_zorb": 0.5}},
    {"model": "mix"},
    {"model": "tuned"},
]


def test_vllm_answers_as_the_builtin_engine(vllm: dict[str, Any], lorafuse: str) -> None:
    world = vllm["world"]
    prompts = _prompts(world)
    reqs = [{**spec, "prompt": p, "max_tokens": 12} for p in prompts for spec in SPECS]
    got = []
    started = time.monotonic()
    for req in reqs:
        response = httpx.post(lorafuse + "/v1/completions", json={**req, "temperature": 0}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == req["model"]
        got.append(response.json()["choices"][0]["text"])
    elapsed = time.monotonic() - started
    expected = _reference(world, vllm["folder"], reqs)
    same = sum(g == e for g, e in zip(got, expected, strict=True))
    print(f"\n{same}/{len(reqs)} completions equal the built-in engine's; {elapsed:.1f} s for {len(reqs)}")
    assert got == expected
    # streamed and chat: the same text
    stream = httpx.post(
        lorafuse + "/v1/completions",
        json={"model": "math", "prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stream": True},
        timeout=120,
    )
    lines = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in lines) == expected[SPECS.index({"model": "math"})]
    chat = httpx.post(
        lorafuse + "/v1/chat/completions",
        json={
            "model": "math",
            "messages": [{"role": "user", "content": prompts[0]}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=120,
    )
    assert chat.json()["choices"][0]["message"]["content"] == expected[SPECS.index({"model": "math"})]
    refused = httpx.post(
        lorafuse + "/v1/completions", json={"model": "flow", "prompt": prompts[0]}, timeout=60
    )
    assert refused.status_code == 400 and "without `--engine vllm`" in refused.json()["error"]["message"]
    assert len(set(got)) > len(SPECS) // 2  # the adapters and compositions answer differently
    # log-probabilities of generated tokens come back from vLLM (prompt ones are refused)
    scored = httpx.post(
        lorafuse + "/v1/completions",
        json={"model": "math", "prompt": prompts[0], "max_tokens": 4, "temperature": 0, "logprobs": 2},
        timeout=120,
    )
    assert scored.status_code == 200, scored.text
    lp = scored.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == scored.json()["usage"]["completion_tokens"]
    assert all(
        max(top.values()) == pytest.approx(c, abs=1e-4)
        for c, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True)
    )


def test_vllm_launch(tiny_world: Path, adapters: Path, tmp_path: Path) -> None:
    """``--vllm-launch`` starts vLLM's server itself and stops it on SIGTERM."""
    port, log = _port(), tmp_path / "lorafuse.log"
    command = [
        sys.executable,
        "-m",
        "lorafuse",
        "serve",
        "--base",
        str(tiny_world / "base"),
        "--tokenizer",
        str(tiny_world / "tokenizer"),
        "--adapters",
        str(adapters),
        "--model-name",
        BASE,
        "--port",
        str(port),
        "--engine",
        "vllm",
        "--vllm-launch",
        "--vllm-python",
        str(VLLM_PYTHON),
        "--vllm-args",
        "--dtype float32 --enforce-eager --gpu-memory-utilization 0.3",
        "--vllm-max-lora-rank",
        str(MAX_RANK),
        "--vllm-cache",
        str(tmp_path / "cache"),
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process, log, "lorafuse serve --engine vllm --vllm-launch")
        print(f"\nlorafuse + vLLM up in {time.monotonic() - started:.0f} s")
        reqs = [{"model": "math", "prompt": p, "max_tokens": 10} for p in _prompts(tiny_world)] + [
            {
                "model": BASE,
                "compose": {"rand0": 0.7, "rand3": 0.4},
                "prompt": _prompts(tiny_world)[0],
                "max_tokens": 10,
            }
        ]
        got = []
        for req in reqs:
            response = httpx.post(url + "/v1/completions", json={**req, "temperature": 0}, timeout=120)
            assert response.status_code == 200, response.text
            got.append(response.json()["choices"][0]["text"])
        assert got == _reference(tiny_world, adapters, reqs)
    finally:
        _stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert "vllm.entrypoints.openai.api_server" in log.read_text()
