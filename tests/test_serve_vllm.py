"""``lorafuse serve --engine vllm`` in front of a fake vLLM server.

The fake mimics the routes lorafuse uses (``/health``, ``/v1/models``, ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, streamed ``/v1/completions`` with token-id prompts and
``return_token_ids``) and answers with HF greedy generation of the tiny world's base with the
adapter folder lorafuse wrote attached, so the texts are real and must equal lorafuse's own
single-request reference (the built-in engine's answers) token for token.
"""

from __future__ import annotations

import json
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
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.adapters import load_lora
from lorafuse.export import adapter_writer
from lorafuse.runtime import attach, detach
from lorafuse.serve import Limits, Server, ServeSettings
from lorafuse.serve.registry import Registry
from lorafuse.serve.vllm import VllmBackend
from lorafuse.serve.vllm_cache import content_name
from lorafuse.studies.serving import reference, serving_folder

KEY = "test-key"
BASE = "world"
VLLM_BASE = "vbase"  # vLLM's name of the base: lorafuse maps it


def _model(world: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeVllm:
    """The routes of vLLM's OpenAI server lorafuse uses, over HF generation on the world's base."""

    def __init__(self, world: Path, max_lora_rank: int = 64) -> None:
        self.model = _model(world)
        self.eos = AutoTokenizer.from_pretrained(world / "tokenizer").eos_token_id
        self.max_lora_rank = max_lora_rank
        self.loras: dict[str, Any] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        app = FastAPI()

        @app.get("/health")
        async def health() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [{"id": VLLM_BASE, "object": "model", "parent": None, "max_model_len": 256}]
            cards += [{"id": n, "object": "model", "parent": VLLM_BASE} for n in self.loras]
            return {"object": "list", "data": cards}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Any:
            body = await request.json()
            self.calls.append(("load", body))
            name, path = body["lora_name"], body["lora_path"]
            if name in self.loras:
                return _error(400, f"The lora adapter '{name}' has already been loaded.")
            lora = load_lora(path, name=name)
            rank = max(m.A.shape[0] for m in lora.modules.values())
            if rank > self.max_lora_rank:
                return _error(400, f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
            self.loras[name] = lora
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Any:
            body = await request.json()
            self.calls.append(("unload", body))
            if self.loras.pop(body["lora_name"], None) is None:
                return _error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
            return PlainTextResponse("Success")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            self.calls.append(("completions", body))
            prompt = body["prompt"]
            assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt), "ids expected"
            assert body.get("stream") and body.get("return_token_ids")
            model = body["model"]
            if model != VLLM_BASE and model not in self.loras:
                return _error(404, f"The model `{model}` does not exist.")
            tokens, scores = self.generate(
                prompt, self.loras.get(model), body["max_tokens"], body.get("min_tokens", 0)
            )
            finish = "stop" if tokens and tokens[-1] == self.eos else "length"
            k = body.get("logprobs")
            assert k is None or body.get("return_tokens_as_token_ids")

            def logprobs(i: int, token: int) -> dict[str, Any] | None:
                if k is None:
                    return None
                logp = torch.log_softmax(scores[i][0].float(), -1)
                top = {f"token_id:{t}": float(logp[t]) for t in logp.topk(k).indices.tolist()}
                top[f"token_id:{token}"] = float(logp[token])  # the chosen one too, as vLLM does
                return {
                    "tokens": [f"token_id:{token}"],
                    "token_logprobs": [float(logp[token])],
                    "top_logprobs": [top],
                    "text_offset": [0],
                }

            def events() -> Iterator[str]:
                for i, token in enumerate(tokens):
                    last = i == len(tokens) - 1
                    choice = {
                        "index": 0,
                        "text": "?",
                        "logprobs": logprobs(i, token),
                        "finish_reason": finish if last else None,
                        "token_ids": [token],
                    }
                    yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        self.app = app

    @torch.no_grad()
    def generate(self, ids: list[int], lora: Any, max_tokens: int, min_tokens: int) -> tuple[list[int], Any]:
        with self.lock:
            if lora is not None:
                attach(self.model, {"x": lora})
            try:
                out = self.model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=max_tokens,
                    min_new_tokens=min_tokens,
                    do_sample=False,
                    eos_token_id=self.eos,
                    pad_token_id=self.eos,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            finally:
                if lora is not None:
                    detach(self.model)
        return out.sequences[0, len(ids) :].tolist(), out.scores

    def names(self, route: str) -> list[str]:
        return [c[1].get("lora_name") or c[1].get("model") for c in self.calls if c[0] == route]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)


class Background:
    """A uvicorn server in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = _port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the fake vLLM did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("served-vllm") / "adapters"
    names = serving_folder(tiny_world, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "tokenizer")
    prompts = [json.loads(line)["prompt"] for line in (tiny_world / "data" / "math" / "test.jsonl").open()][
        :2
    ]
    return {"world": tiny_world, "folder": folder, "names": names, "tokenizer": tokenizer, "prompts": prompts}


@pytest.fixture(scope="module")
def fake(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    vllm = FakeVllm(served["world"])
    with Background(vllm.app) as url:
        yield {"url": url, "vllm": vllm}


def _server(served: dict[str, Any], url: str, cache: Path, **backend: Any) -> Server:
    settings = ServeSettings(base_name=BASE, api_key=KEY, limits=Limits(max_tokens=64))
    meta = _model(served["world"]).to("meta")
    options = {"max_lora_rank": 64, "max_loaded": 64, "max_cache_bytes": 1 << 30} | backend
    vllm = VllmBackend(
        url,
        served["tokenizer"],
        write=adapter_writer(Registry(served["folder"])),
        cache_dir=cache,
        max_length=256,
        vocab_size=len(served["tokenizer"]),
        **options,
    )
    return Server(meta, served["tokenizer"], served["folder"], settings, backend=vllm)


@pytest.fixture(scope="module")
def server(
    served: dict[str, Any], fake: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    srv = _server(served, fake["url"], tmp_path_factory.mktemp("vllm-cache"))
    with srv.background() as url:
        yield {**served, **fake, "url": url, "server": srv}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def _complete(client: openai.OpenAI, req: dict[str, Any]) -> Any:
    extra = {"min_tokens": req.get("min_tokens", 0)} | (
        {"compose": req["compose"]} if "compose" in req else {}
    )
    return client.completions.create(
        model=req["model"],
        prompt=req["prompt"],
        max_tokens=req["max_tokens"],
        temperature=0,
        extra_body=extra,
    )


def _post(url: str, body: dict[str, Any], route: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + route, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


STATIC = [
    {"model": "math"},
    {"model": "rand2"},
    {"model": BASE},
    {"model": BASE, "compose": {"rand0": 0.7, "rand3": 0.4}},
    {"model": BASE, "compose": {"math": 1.0, "lang_zorb": 0.5, "rand5": 0.25}},
    {"model": "mix"},  # a static fusion: one cat adapter
    {"model": BASE, "compose": "mix"},
    {"model": "tuned"},  # a low-rank compressed delta: its factors
]


def test_forwarded_answers_equal_the_builtin_reference(server: dict[str, Any]) -> None:
    client = _client(server["url"])
    reqs = [
        {**spec, "prompt": p, "max_tokens": 6 + i, "min_tokens": 6 + i}
        for i, p in enumerate(server["prompts"])
        for spec in STATIC
    ]
    got = [_complete(client, r) for r in reqs]
    model, tok = _model(server["world"]), server["tokenizer"]
    assert [g.choices[0].text for g in got] == [
        reference(model, tok, server["folder"], r, BASE) for r in reqs
    ]
    assert [g.model for g in got] == [r["model"] for r in reqs]  # what the client asked for
    assert len({g.choices[0].text for g in got}) > len(STATIC)  # the compositions really differ
    sent = {c[1]["model"] for c in server["vllm"].calls if c[0] == "completions"}
    assert VLLM_BASE in sent and all(n == VLLM_BASE or n.startswith("lf-") for n in sent)
    # one adapter per distinct composition, loaded once; "mix" and compose="mix" are one adapter
    loads = server["vllm"].names("load")
    assert len(loads) == len(set(loads)) == len(STATIC) - 2


def test_streaming_chat_and_stop_strings(server: dict[str, Any]) -> None:
    client, prompt = _client(server["url"]), server["prompts"][0]
    whole = _complete(client, {"model": "rand1", "prompt": prompt, "max_tokens": 8, "min_tokens": 8})
    text = whole.choices[0].text
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
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model == "rand1"
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model="rand1", messages=messages, max_tokens=8, temperature=0, extra_body={"min_tokens": 8}
    )
    assert chat.choices[0].message.content == text and chat.usage.completion_tokens == 8
    assert chat.model == "rand1" and chat.object == "chat.completion"
    parts = list(
        client.chat.completions.create(
            model="rand1",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 8},
        )
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text
    word = text.split()[3]
    cut = client.completions.create(
        model="rand1", prompt=prompt, max_tokens=8, temperature=0, stop=[word], extra_body={"min_tokens": 8}
    )
    assert cut.choices[0].text == text[: text.index(word)] and cut.choices[0].finish_reason == "stop"
    sent = [c[1] for c in server["vllm"].calls if c[0] == "completions"][-1]
    assert sent["stop"] == [word] and sent["prompt"][0] == server["tokenizer"].bos_token_id  # lorafuse's <s>


def test_logprobs_of_generated_tokens(server: dict[str, Any]) -> None:
    client, prompt = _client(server["url"]), server["prompts"][0]
    plain = _complete(client, {"model": "rand1", "prompt": prompt, "max_tokens": 5})
    out = client.completions.create(model="rand1", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == plain.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the best one
    assert "".join(lp.tokens) == out.choices[0].text  # word tokens carry their space


def test_what_vllm_cannot_serve_is_a_400_naming_the_builtin_engine(server: dict[str, Any]) -> None:
    url, prompt = server["url"], server["prompts"][0]
    for body in (
        {"model": "flow", "prompt": prompt},
        {"model": "catw", "prompt": prompt, "stream": True},
        {"model": BASE, "compose": "flow", "prompt": prompt},
        {"model": "math", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1},
    ):
        response = _post(url, body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert "without `--engine vllm`" in error["message"] and error["code"] == "not_servable_on_vllm"
    assert _post(url, {"model": "dense", "prompt": prompt}).status_code == 404  # as with the built-in engine
    assert _post(url, {"model": "nope", "prompt": prompt}).status_code == 404
    assert _post(url, {"model": BASE, "compose": {"math": -1}, "prompt": prompt}).status_code == 400


def test_rank_above_vllms_limit_is_refused(
    served: dict[str, Any], fake: dict[str, Any], tmp_path: Path
) -> None:
    srv = _server(served, fake["url"], tmp_path / "cache", max_lora_rank=8)
    with srv.background() as url:
        body = {"model": BASE, "compose": {"math": 1.0, "rand3": 0.5}, "prompt": served["prompts"][0]}
        response = _post(url, body)
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "--max-lora-rank 8" in message and "without `--engine vllm`" in message
        assert _post(url, {"model": "rand0", "prompt": served["prompts"][0]}).status_code == 200  # rank 2


def test_adapter_cache_names_lru_and_unloads(
    served: dict[str, Any], fake: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    srv = _server(served, fake["url"], cache, max_loaded=2, max_cache_bytes=1)
    vllm: FakeVllm = fake["vllm"]
    vllm.calls.clear()
    prompt = served["prompts"][0]
    with srv.background() as url:
        for name in ("rand0", "rand1", "rand2", "rand0"):
            assert _post(url, {"model": name, "prompt": prompt, "max_tokens": 2}).status_code == 200
        # a cap of one byte keeps only the newest adapter on disk; each eviction unloads it first
        folders = sorted(p.name for p in cache.iterdir())
        assert len(folders) == 1 and folders[0] == content_name(cache / folders[0])
        loads, unloads = vllm.names("load"), vllm.names("unload")
        assert len(loads) == 4 and len(set(loads)) == 3  # rand0 evicted, then written and loaded again
        assert unloads == loads[:3]
        assert folders[0] == loads[-1]
        # the same composition gets the same name; a plain adapter is its folder's files
        assert content_name(served["folder"] / "rand0") == loads[0]


def test_concurrent_requests_with_few_adapters_loaded(
    served: dict[str, Any], fake: dict[str, Any], tmp_path: Path
) -> None:
    """Adapters used by running requests are never unloaded; the answers stay right."""
    srv = _server(served, fake["url"], tmp_path / "cache", max_loaded=2)
    reqs = [
        {**spec, "prompt": p, "max_tokens": 4}
        for p in served["prompts"]
        for spec in (
            {"model": "rand0"},
            {"model": "rand1"},
            {"model": BASE, "compose": {"rand2": 0.5, "rand4": 1.0}},
        )
    ]
    results: list[str] = [""] * len(reqs)
    with srv.background() as url:
        client = _client(url)

        def run(i: int) -> None:
            results[i] = _complete(client, reqs[i]).choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        backend = srv.engine
        assert isinstance(backend, VllmBackend)
        deadline = time.monotonic() + 10  # idle adapters past max_loaded are unloaded after their rows
        while sum(c.loaded for c in backend.cache.entries.values()) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(c.loaded for c in backend.cache.entries.values()) <= 2
        assert all(c.refs == 0 for c in backend.cache.entries.values()) and not backend.rows
    model = _model(served["world"])
    assert results == [reference(model, served["tokenizer"], served["folder"], r, BASE) for r in reqs]


def test_adapter_lost_by_vllm_is_loaded_again(server: dict[str, Any]) -> None:
    url, prompt = server["url"], server["prompts"][1]
    first = _post(url, {"model": "rand4", "prompt": prompt, "max_tokens": 4}).json()["choices"][0]["text"]
    server["vllm"].loras.clear()  # vLLM restarted
    again = _post(url, {"model": "rand4", "prompt": prompt, "max_tokens": 4})
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == first


def test_vllm_down_is_a_503_with_one_line(served: dict[str, Any], tmp_path: Path) -> None:
    srv = _server(served, f"http://127.0.0.1:{_port()}", tmp_path / "cache")
    with srv.background() as url:
        for body in (
            {"model": "math", "prompt": "a"},
            {"model": BASE, "prompt": "a", "stream": True},
            {"model": BASE, "messages": [{"role": "user", "content": "a"}]},
        ):
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            response = _post(url, body, route)
            assert response.status_code == 503
            message = response.json()["error"]["message"]
            assert (
                "vLLM at http://127.0.0.1:" in message and "not reachable" in message and "\n" not in message
            )
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "not reachable" in health.json()["error"]["message"]
        # lorafuse's own checks still answer first
        assert _post(url, {"model": "math", "prompt": "a", "max_tokens": 10**6}).status_code == 400
        assert httpx.post(url + "/v1/completions", json={"model": "math", "prompt": "a"}).status_code == 401


@pytest.mark.parametrize(
    ("flags", "wanted"),
    [
        (["--engine", "tgi"], "--engine must be one of builtin, vllm"),
        (["--engine", "vllm"], "--engine vllm needs --vllm-url"),
        (["--vllm-url", "http://127.0.0.1:1"], "--vllm-url is for --engine vllm"),
        (["--engine", "vllm", "--vllm-url", "ftp://x"], "--vllm-url: 'ftp://x' is not an http(s) URL"),
        (
            ["--engine", "vllm", "--vllm-url", "http://h:1", "--vllm-max-lora-rank", "12"],
            "--vllm-max-lora-rank must be one vLLM accepts",
        ),
    ],
)
def test_bad_engine_flags_are_one_line_and_exit_2(
    flags: list[str], wanted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli

    (tmp_path / "adapters").mkdir()
    code, _, err = run_cli(
        ["serve", "--base", str(tmp_path), "--adapters", str(tmp_path / "adapters"), *flags], capsys
    )
    assert (
        code == 2
        and err.strip().startswith("error: ")
        and wanted in err
        and len(err.strip().splitlines()) == 1
    )
