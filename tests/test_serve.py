"""The OpenAI-compatible server, started for real on 127.0.0.1 with the tiny skill world.

Answers of concurrent, mixed batches (adapters, weighted compositions, LoRA-Flow / CAT / static
fusions, a compressed delta, the base) must equal the single-request path token for token.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.serve import Limits, Server, ServeSettings
from lorafuse.serve.compose import Composition, error_type
from lorafuse.serve.engine import Engine, QueueFull, Request, SamplingParams
from lorafuse.studies.serving import reference, serving_folder

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
        base_name=BASE, api_key=KEY, max_batch=8, max_loaded=4, limits=Limits(max_tokens=64), threads=1
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
        ({"model": "math", "prompt": "a", "n": 0}, 400, "n:"),
        ({"model": "math", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": "math", "prompt": "a", "logprobs": 21}, 400, "logprobs"),
        ({"model": "math", "prompt": ["a"] * 33}, 400, "at most 32"),
        ({"model": "math", "prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
        ({"model": "math", "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
        ({"model": "dense", "prompt": "a"}, 404, "is not served: a rtn delta is dense"),
        ({"model": "flow", "prompt": "a", "compose": {"flow": 1}}, 400, "base model"),
        ({"model": BASE, "prompt": "a", "compose": {"flow": 1}}, 400, "fusion"),
        # raw bodies: what json.loads accepts but no handler should see
        (b'{"model": "math", "prompt": "a \\ud800 b"}', 400, "prompt: not valid Unicode"),
        (b'{"model": "math", "prompt": ["a", "\\udfff"]}', 400, "prompt.1: not valid Unicode"),
        (b'{"model": "math", "prompt": "a", "stop": ["\\ud800"]}', 400, "stop.0: not valid Unicode"),
        (b'{"model": "math", "prompt": "a", "user": ' + b"1" * 4400 + b"}", 400, "4300"),
        (b'{"model": "math", "prompt": "a", "max_tokens": ' + b"9" * 4400 + b"}", 400, "4300"),
        (b'{"model": "world", "prompt": "a", "compose": {"math": 1' + b"0" * 400 + b"}}", 400, "finite"),
        (b'{"model": "math", "prompt": "a", "extra": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nests deeper"),
        (
            b'{"model": "math", "prompt": "a", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "deeper",
        ),
        ({"model": "math", "prompt": "a", "seed": 2**64}, 400, "seed"),
        ({"model": "math", "prompt": "a", "seed": -1}, 400, "seed"),
        ({"model": "math", "prompt": "a", "seed": 2**64 - 1, "temperature": 1, "max_tokens": 2}, 200, ""),
        ({"model": "math", "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
        ({"model": "math", "prompt": "a", "stream": "yes"}, 400, "stream"),
        ({"model": "x" * 100_000, "prompt": "a"}, 404, "does not exist"),
    ],
)
def test_bad_input_gets_4xx_json(server: dict[str, Any], body: Any, status: int, words: str) -> None:
    raw = body if isinstance(body, bytes) else (b"{not json" if body is None else None)
    response = _post(server["url"], body, raw=raw)
    assert response.status_code == status, response.text
    if status == 200:
        return
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == error_type(status)
    assert len(error["message"]) < 1000  # never the client's whole input echoed back


def test_chat_message_with_a_lone_surrogate_is_400(server: dict[str, Any]) -> None:
    raw = b'{"model": "math", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=headers)
    assert response.status_code == 400
    assert "messages.0.content: not valid Unicode" in response.json()["error"]["message"]


def test_gauges_return_to_zero_when_idle(server: dict[str, Any]) -> None:
    client = _client(server["url"])
    _complete(client, {"model": "rand2", "prompt": server["prompts"][0], "max_tokens": 4, "min_tokens": 4})
    headers = {"Authorization": f"Bearer {KEY}"}

    def gauges() -> dict[str, float]:
        text = httpx.get(server["url"] + "/metrics", headers=headers).text
        names = ("lorafuse_running_rows", "lorafuse_waiting_requests", "lorafuse_batch_distinct_compositions")
        return {
            line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(names)
        }

    deadline = time.monotonic() + 10
    while any(gauges().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gauges() == dict.fromkeys(gauges(), 0.0) and len(gauges()) == 3
    assert "lorafuse_engine_threads 1.0" in httpx.get(server["url"] + "/metrics", headers=headers).text


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
    import subprocess
    import sys

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
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output  # SIGTERM is a graceful shutdown, not a kill
    assert "intra-op thread(s) of" in output and "lorafuse serve: shut down" in output


def test_multi_prompt_request_is_queued_whole_or_not_at_all(served: dict[str, Any]) -> None:
    """Through the app on an engine that is not running: nothing leaves its queue."""
    import asyncio

    from lorafuse.runtime.pool import AdapterPool
    from lorafuse.serve import Registry, Resolver, build_app

    model = _model(served["world"])
    engine = Engine(model, served["tokenizer"], AdapterPool(model), max_queue=3)
    app = build_app(engine, Resolver(Registry(served["folder"]), BASE), api_key=KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    prompts = served["prompts"]

    async def call(method: str, route: str, body: dict[str, Any] | None = None) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, route, json=body, headers=headers)

    def post(body: dict[str, Any]) -> httpx.Response:
        return asyncio.run(call("POST", "/v1/completions", body))

    engine.submit(Request([1, 5], Composition("base"), SamplingParams(), lambda e: None))
    full = post({"model": "math", "prompt": prompts[:3]})
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    assert engine.queue_length == 1  # none of the three prompts was left queued
    engine.shutdown()  # from now on every route but /metrics answers 503
    draining = [post({"model": "math", "prompt": "a"}), asyncio.run(call("GET", "/health"))]
    for response in draining:
        assert response.status_code == 503 and "shutting down" in response.json()["error"]["message"]
    assert asyncio.run(call("GET", "/metrics")).status_code == 200


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--max-batch", "0"], None, "--max-batch must be ≥ 1, got 0"),
        (["--max-queue", "0"], None, "--max-queue must be ≥ 1"),
        (["--max-loaded", "0"], None, "--max-loaded must be ≥ 1"),
        (["--max-prompt-tokens", "0"], None, "--max-prompt-tokens must be ≥ 1"),
        (["--max-tokens", "0"], None, "--max-tokens must be ≥ 1"),
        (["--max-batch", "-3"], None, "--max-batch must be ≥ 1, got -3"),
        (["--port", "99999"], None, "--port must be ≥ 1 and ≤ 65535, got 99999"),
        (["--port", "-1"], None, "--port must be ≥ 1 and ≤ 65535, got -1"),
        (["--port", "0"], None, "--port must be ≥ 1"),
        (["--threads", "0"], None, "--threads must be ≥ 1"),
        (["--shutdown-grace", "-1"], None, "--shutdown-grace must be ≥ 0"),
        (["--shutdown-grace", "nan"], None, "--shutdown-grace must be a finite number"),
        (["--log-level", "loud"], None, "--log-level must be one of"),
        (["--api-key", ""], None, "--api-key is empty"),
        (["--api-key", "  "], None, "--api-key is empty"),
        ([], "", "$LORAFUSE_API_KEY is set but empty"),
        (["--host", "no.such.host.invalid"], None, "--host"),
        (["--port", "IN_USE"], None, "cannot listen there"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(
    args: list[str],
    env: str | None,
    words: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.conftest import run_cli

    if env is None:
        monkeypatch.delenv("LORAFUSE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LORAFUSE_API_KEY", env)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [str(busy.getsockname()[1]) if a == "IN_USE" else a for a in args]
        code, out, err = run_cli(
            ["serve", "--base", tmp_path / "no-base", "--adapters", tmp_path, *args], capsys
        )
    assert code == 2, (out, err)
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"max_batch": 0}, "max_batch must be ≥ 1"),
        ({"max_queue": 0}, "max_queue must be ≥ 1"),
        ({"max_loaded": 0}, "max_loaded must be ≥ 1"),
        ({"max_batch": 2.5}, "max_batch must be a whole number"),
        ({"api_key": ""}, "api_key is empty"),
        ({"threads": 0}, "threads must be ≥ 1"),
        ({"shutdown_grace": float("inf")}, "shutdown_grace must be a finite number"),
        ({"table_ratio": float("nan")}, "table_ratio must be a finite number"),
        ({"limits": "max_tokens=0"}, "Limits.max_tokens must be ≥ 1"),
        ({"limits": "max_body_bytes=0"}, "Limits.max_body_bytes must be ≥ 1"),
        ({"limits": "default_max_tokens=99"}, "Limits.default_max_tokens must be ≤ 64"),
        ({"weights": "max_abs=0"}, "weights.max_abs must be > 0"),
    ],
)
def test_serve_settings_are_checked_when_made(settings: dict[str, Any], words: str) -> None:
    from lorafuse._checks import InvalidValueError
    from lorafuse.serve import WeightLimits

    def build() -> ServeSettings:
        fields = dict(settings)
        for key, cls in (("limits", Limits), ("weights", WeightLimits)):
            if key in fields:
                name, value = fields[key].split("=")
                extra = {"max_tokens": 64} if name == "default_max_tokens" else {}
                fields[key] = cls(**{name: int(value), **extra})
        return ServeSettings(**fields)

    with pytest.raises(InvalidValueError, match=words.replace("$", "\\$")):
        build()


@pytest.mark.parametrize(
    ("text", "folders", "expected"),
    [
        (
            "/srv/adapters/math/adapter_model.safetensors: truncated",
            {"/srv/adapters/math": "math"},
            "math/adapter_model.safetensors: truncated",
        ),
        ("cannot open /home/me/secret/x.json (no such file)", {}, "cannot open x.json (no such file)"),
        (
            "rank 4/8 of q_proj, see https://example.org/a/b",
            {},
            "rank 4/8 of q_proj, see https://example.org/a/b",
        ),
        ("bad text \ud800 here", {}, "bad text ? here"),
    ],
)
def test_public_text_hides_server_paths(text: str, folders: dict[str, str], expected: str) -> None:
    from lorafuse.serve.compose import public_text

    assert public_text(text, folders) == expected


def test_engine_threads_default_to_the_available_cores_less_one() -> None:
    from lorafuse.serve.engine import available_cores, default_threads

    cores = available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert default_threads() == max(1, cores - 1)
    assert (
        ServeSettings().engine_threads == default_threads() and ServeSettings(threads=3).engine_threads == 3
    )
