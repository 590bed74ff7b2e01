"""The OpenAI-compatible server, started for real on 127.0.0.1 with the tiny skill world.

Answers of concurrent, mixed batches (adapters, weighted compositions, LoRA-Flow / CAT / static
fusions, a compressed delta, the base) must equal the single-request path token for token.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.serve import Limits, Server, ServeSettings
from lorafuse.serve.compose import Composition
from lorafuse.serve.engine import Engine, QueueFull, Request, SamplingParams
from lorafuse.skillworld.serving import reference, serving_folder

KEY = "test-key"
BASE = "world"
SPECS: list[dict[str, Any]] = [
    {"model": "math"},
    {"model": "rand2"},
    {"model": BASE},
    {"model": BASE, "compose": {"rand0": 0.7, "rand3": 0.4}},
    {"model": BASE, "compose": {"math": 1.0, "lang_zorb": 0.5, "rand5": 0.25}},
    {"model": "flow"},
    {"model": BASE, "compose": "flow"},
    {"model": "catw"},
    {"model": "mix"},
    {"model": "tuned"},
]


def _model(world: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def served(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("served") / "adapters"
    names = serving_folder(tiny_world, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "tokenizer")
    prompts = [json.loads(line)["prompt"] for line in (tiny_world / "data" / "math" / "test.jsonl").open()][
        :3
    ]
    return {"world": tiny_world, "folder": folder, "names": names, "tokenizer": tokenizer, "prompts": prompts}


@pytest.fixture(scope="module")
def server(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    settings = ServeSettings(
        base_name=BASE, api_key=KEY, max_batch=8, max_loaded=4, limits=Limits(max_tokens=64)
    )
    srv = Server(_model(served["world"]), served["tokenizer"], served["folder"], settings)
    with srv.background() as url:
        yield {"url": url, "server": srv, **served}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def _complete(client: openai.OpenAI, req: dict[str, Any]) -> str:
    extra = {"min_tokens": req["min_tokens"]} | ({"compose": req["compose"]} if "compose" in req else {})
    out = client.completions.create(
        model=req["model"],
        prompt=req["prompt"],
        max_tokens=req["max_tokens"],
        temperature=0,
        extra_body=extra,
    )
    return out.choices[0].text


def _requests(prompts: list[str]) -> list[dict[str, Any]]:
    return [
        {**spec, "prompt": p, "max_tokens": 5 + i, "min_tokens": 5 + i}
        for i, p in enumerate(prompts)
        for spec in SPECS
    ]


def _concurrently(client: openai.OpenAI, reqs: list[dict[str, Any]]) -> list[str]:
    results: list[str] = [""] * len(reqs)

    def run(i: int) -> None:
        results[i] = _complete(client, reqs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_models_health_metrics(server: dict[str, Any]) -> None:
    url = server["url"]
    ids = [m.id for m in _client(url).models.list().data]
    names = server["names"]
    assert ids[0] == BASE
    assert set(ids[1:]) == set(names["adapters"] + names["fusions"] + names["compressed"])
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "lorafuse_http_requests_total" in text and "lorafuse_adapters_loaded" in text


def test_mixed_batch_equals_single_requests(server: dict[str, Any]) -> None:
    reqs = _requests(server["prompts"])
    got = _concurrently(_client(server["url"]), reqs)
    model, tok = _model(server["world"]), server["tokenizer"]
    expected = [reference(model, tok, server["folder"], r, BASE) for r in reqs]
    assert got == expected
    assert len(set(got)) > len(SPECS)  # the compositions really answer differently
    stats = server["server"].pool.stats
    assert stats.evictions > 0  # max_loaded=4 with 13 adapters in use: LRU at work


def test_gathered_kernel_equals_single_requests(served: dict[str, Any]) -> None:
    settings = ServeSettings(base_name=BASE, max_batch=16, table_max_ranks=0, table_ratio=0)
    srv = Server(_model(served["world"]), served["tokenizer"], served["folder"], settings)
    reqs = _requests(served["prompts"][:1])
    with srv.background() as url:
        got = _concurrently(_client(url), reqs)
    model = _model(served["world"])
    assert got == [reference(model, served["tokenizer"], served["folder"], r, BASE) for r in reqs]
    assert srv.pool.stats.forwards["gathered"] > 0 and srv.pool.stats.forwards["table"] == 0


def test_streaming_completion_and_chat(server: dict[str, Any]) -> None:
    client = _client(server["url"])
    prompt = server["prompts"][0]
    whole = _complete(client, {"model": "rand1", "prompt": prompt, "max_tokens": 8, "min_tokens": 8})
    chunks = list(
        client.completions.create(
            model="rand1",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 8},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="rand1",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"min_tokens": 8},
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole
    chat = client.chat.completions.create(
        model="rand1",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        extra_body={"min_tokens": 8},
    )
    assert chat.choices[0].message.content == whole and chat.usage.completion_tokens == 8


def test_stop_strings_and_sampling_seed(server: dict[str, Any]) -> None:
    client = _client(server["url"])
    prompt = server["prompts"][1]
    whole = _complete(client, {"model": "rand4", "prompt": prompt, "max_tokens": 10, "min_tokens": 10})
    word = whole.split()[3]
    cut = client.completions.create(
        model="rand4", prompt=prompt, max_tokens=10, temperature=0, stop=[word], extra_body={"min_tokens": 10}
    )
    assert cut.choices[0].text == whole[: whole.index(word)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="rand4", prompt=prompt, max_tokens=10, temperature=1.0, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # seeded sampling repeats


def _post(url: str, body: Any, *, raw: bytes | None = None, key: str = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (None, 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"prompt": "a"}, 400, "model"),
        ({"model": "math"}, 400, "prompt"),
        ({"model": "nope", "prompt": "a"}, 404, "does not exist"),
        ({"model": "../adapters/math", "prompt": "a"}, 404, "does not exist"),
        ({"model": "/etc/passwd", "prompt": "a"}, 404, "does not exist"),
        ({"model": BASE, "prompt": "a", "compose": {"math": float("nan")}}, 400, "finite"),
        ({"model": BASE, "prompt": "a", "compose": {"math": -0.5}}, 400, "negative"),
        ({"model": BASE, "prompt": "a", "compose": {"math": 1, "../x": 1}}, 404, "does not exist"),
        ({"model": BASE, "prompt": "a", "compose": {}}, 400, "empty"),
        ({"model": BASE, "prompt": "a", "compose": {"math": "1"}}, 400, "number"),
        ({"model": "math", "prompt": "a", "compose": {"math": 1}}, 400, "base model"),
        ({"model": "math", "prompt": "a", "max_tokens": 100000}, 400, "limit"),
        ({"model": "math", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "math", "prompt": "a " * 3000}, 400, "tokens"),
        ({"model": "math", "prompt": "a", "n": 2}, 400, "n=1"),
        ({"model": "math", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": "math", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
        ({"model": "math", "prompt": ["a"] * 33}, 400, "at most 32"),
        ({"model": "math", "prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
        ({"model": "math", "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
        ({"model": "dense", "prompt": "a"}, 400, "dense"),
        ({"model": "flow", "prompt": "a", "compose": {"flow": 1}}, 400, "base model"),
        ({"model": BASE, "prompt": "a", "compose": {"flow": 1}}, 400, "fusion"),
    ],
)
def test_bad_input_gets_4xx_json(server: dict[str, Any], body: Any, status: int, words: str) -> None:
    response = _post(server["url"], body, raw=b"{not json" if body is None else None)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]


def test_auth_body_size_and_unknown_route(server: dict[str, Any]) -> None:
    url = server["url"]
    assert _post(url, {"model": "math", "prompt": "a"}, key="wrong").status_code == 401
    big = _post(url, None, raw=b'{"model": "math", "prompt": "' + b"a " * 600_000 + b'"}')
    assert big.status_code == 413
    missing = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "error" in missing.json()


def test_hot_add_and_a_broken_adapter_fails_alone(server: dict[str, Any]) -> None:
    folder: Path = server["folder"]
    shutil.copytree(folder / "rand3", folder / "late")  # servable without a restart
    broken = folder / "broken"
    shutil.copytree(folder / "rand3", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    client = _client(server["url"])
    prompt = server["prompts"][0]
    good = [{"model": "late", "prompt": prompt, "max_tokens": 6, "min_tokens": 6}] * 3
    errors: list[int] = []

    def bad() -> None:
        try:
            _complete(client, {"model": "broken", "prompt": prompt, "max_tokens": 6, "min_tokens": 6})
        except openai.APIStatusError as exc:
            errors.append(exc.status_code)

    thread = threading.Thread(target=bad)
    thread.start()
    got = _concurrently(client, good)
    thread.join()
    assert errors and 400 <= errors[0] < 600
    expected = reference(
        _model(server["world"]), server["tokenizer"], folder, {**good[0], "model": "rand3"}, BASE
    )
    assert got == [expected] * 3
    assert "late" in [m.id for m in client.models.list().data]


def test_queue_limit_is_429(served: dict[str, Any]) -> None:
    from lorafuse.runtime.pool import AdapterPool

    model = _model(served["world"])
    engine = Engine(model, served["tokenizer"], AdapterPool(model), max_queue=2)  # not started
    for _ in range(2):
        engine.submit(Request([1, 5], Composition("base"), SamplingParams(), lambda e: None))
    with pytest.raises(QueueFull) as info:
        engine.submit(Request([1, 5], Composition("base"), SamplingParams(), lambda e: None))
    assert info.value.status == 429


def test_cli_serve_starts_and_answers(served: dict[str, Any]) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = served["world"]
    command = [
        sys.executable,
        "-m",
        "lorafuse",
        "serve",
        "--base",
        str(world / "base"),
        "--adapters",
        str(served["folder"]),
        "--port",
        str(port),
        "--model-name",
        BASE,
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "LORAFUSE_API_KEY": KEY}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "lorafuse serve did not come up"
            time.sleep(0.2)
        req = {"model": "math", "prompt": served["prompts"][0], "max_tokens": 6, "min_tokens": 6}
        assert _complete(_client(url), req) == reference(
            _model(world), served["tokenizer"], served["folder"], req, BASE
        )
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from the environment
    finally:
        process.terminate()
        process.wait(30)
