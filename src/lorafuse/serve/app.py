"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with ``"stream":
true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus). With an API key set, every route but ``/health`` needs
``Authorization: Bearer <key>``. Errors are OpenAI-style JSON: ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status for anything the client can fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafuse._data import tokenize
from lorafuse.serve.compose import Composition, RequestError, Resolver, error_type
from lorafuse.serve.engine import Engine, Event, SamplingParams
from lorafuse.serve.engine import Request as GenerationRequest
from lorafuse.serve.metrics import ServerMetrics
from lorafuse.serve.schemas import ChatRequest, CompletionRequest, _Common


@dataclass(frozen=True)
class Limits:
    """Per-request limits; breaking one is a 400 (413 for the body)."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20
    max_prompts: int = 32


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status)


def error_body(status: int, message: str, *, param: str | None = None, code: object = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def build_app(
    engine: Engine,
    resolver: Resolver,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The FastAPI app around a started :class:`Engine` (the caller starts and stops it)."""
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    tokenizer = engine.tokenizer
    base_name = resolver.base_name
    app = FastAPI(title="lorafuse", description="Many LoRA adapters and compositions on one base model")
    app.state.engine = engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        route = request.url.path
        if api_key and route != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                metrics.requests.labels(route, "401").inc()
                return error_response(
                    401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key"
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            metrics.requests.labels(route, "413").inc()
            return error_response(413, f"request body is larger than {limits.max_body_bytes} bytes")
        response = await call_next(request)
        if route in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
            metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict[str, object]:
        if not engine.alive:
            raise RequestError(503, "the engine is not running")
        return {"status": "ok", "running": len(engine.rows), "waiting": engine.queue_length}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        entries = await run_in_threadpool(resolver.registry.scan)
        started = int(time.time())
        data = [
            {
                "id": base_name,
                "object": "model",
                "created": started,
                "owned_by": "lorafuse",
                "root": base_name,
                "parent": None,
            }
        ]
        for entry in entries.values():
            data.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": entry.created,
                    "owned_by": "lorafuse",
                    "root": base_name,
                    "parent": base_name,
                    "lorafuse_kind": entry.kind,
                }
            )
        return {"object": "list", "data": data}

    async def read_body(request: Request, schema: type[_Common]) -> _Common:
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, f"request body is larger than {limits.max_body_bytes} bytes")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RequestError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")
            raise RequestError(400, f"{where}: {message}" if where else message, param=where) from None

    def encode(text: str) -> list[int]:
        return encode_prompt(tokenizer, text, limits)

    def sampling(body: _Common, prompt_len: int, requested: int | None) -> SamplingParams:
        max_tokens = requested if requested is not None else limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise RequestError(
                400, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}", param="max_tokens"
            )
        if prompt_len + max_tokens > engine.max_length:
            raise RequestError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the model's context of "
                f"{engine.max_length} tokens",
                param="max_tokens",
            )
        if body.min_tokens > max_tokens:
            raise RequestError(
                400, f"min_tokens ({body.min_tokens}) > max_tokens ({max_tokens})", param="min_tokens"
            )
        return SamplingParams(
            max_tokens, body.temperature, body.top_p, body.seed, body.stop_strings, body.min_tokens
        )

    async def resolve(body: _Common) -> Composition:
        return await run_in_threadpool(resolver.resolve, body.model, body.compose)

    def start(
        ids: list[int], composition: Composition, params: SamplingParams
    ) -> tuple[GenerationRequest, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = GenerationRequest(
            ids, composition, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        )
        engine.submit(request)
        return request, queue

    async def collect(request: GenerationRequest, queue: asyncio.Queue[Event]) -> Event:
        parts: list[str] = []
        try:
            while True:
                event = await queue.get()
                if event.kind == "text":
                    parts.append(event.text)
                elif event.kind == "error":
                    raise RequestError(event.status, event.text)
                else:
                    event.text = "".join(parts)
                    return event
        except asyncio.CancelledError:
            request.cancel()
            raise

    async def stream(
        request: GenerationRequest,
        queue: asyncio.Queue[Event],
        chunk: Callable[[str | None, Event | None, bool], dict | None],
    ) -> AsyncIterator[str]:
        try:
            first = chunk(None, None, True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                event = await queue.get()
                if event.kind == "text":
                    yield f"data: {json.dumps(chunk(event.text, None, False))}\n\n"
                elif event.kind == "error":
                    err = error_body(event.status, event.text, code=event.status)
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(chunk(None, event, False))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()  # no-op once finished; stops the row if the client went away

    def usage(events: list[Event]) -> dict[str, int]:
        p = sum(e.prompt_tokens for e in events)
        c = sum(e.completion_tokens for e in events)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def envelope(
        kind: str, rid: str, created: int, model: str, choices: list[dict], done: list[Event]
    ) -> dict:
        """One response or stream chunk; ``usage`` once the generation is done."""
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if done:
            out["usage"] = usage(done)
        return out

    def choice(index: int, done: Event | None, **content: object) -> dict:
        finish = done.finish_reason if done else None
        return {"index": index, **content, "logprobs": None, "finish_reason": finish}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        body = await read_body(http, CompletionRequest)
        assert isinstance(body, CompletionRequest)
        if len(body.prompts) > limits.max_prompts:
            raise RequestError(
                400, f"{len(body.prompts)} prompts; at most {limits.max_prompts} per request", param="prompt"
            )
        composition = await resolve(body)
        encoded = [encode(p) for p in body.prompts]
        params = [sampling(body, len(ids), body.max_tokens) for ids in encoded]
        rid, created, kind = f"cmpl-{uuid.uuid4().hex}", int(time.time()), "text_completion"
        if body.stream:
            request, queue = start(encoded[0], composition, params[0])

            def chunk(text: str | None, done: Event | None, opening: bool) -> dict | None:
                if opening:
                    return None
                ends = [done] if done else []
                return envelope(kind, rid, created, body.model, [choice(0, done, text=text or "")], ends)

            return StreamingResponse(stream(request, queue, chunk), media_type="text/event-stream")
        started = [start(ids, composition, p) for ids, p in zip(encoded, params, strict=True)]
        events = list(await asyncio.gather(*(collect(r, q) for r, q in started)))
        choices = [choice(i, e, text=e.text) for i, e in enumerate(events)]
        return JSONResponse(envelope(kind, rid, created, body.model, choices, events))

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Response:
        body = await read_body(http, ChatRequest)
        assert isinstance(body, ChatRequest)
        composition = await resolve(body)
        ids = chat_prompt(tokenizer, body, limits)
        params = sampling(body, len(ids), body.token_limit)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            request, queue = start(ids, composition, params)

            def chunk(text: str | None, done: Event | None, opening: bool) -> dict:
                delta = (
                    {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
                )
                ends = [done] if done else []
                return envelope(
                    "chat.completion.chunk", rid, created, body.model, [choice(0, done, delta=delta)], ends
                )

            return StreamingResponse(stream(request, queue, chunk), media_type="text/event-stream")
        event = await collect(*start(ids, composition, params))
        message = {"role": "assistant", "content": event.text}
        return JSONResponse(
            envelope(
                "chat.completion", rid, created, body.model, [choice(0, event, message=message)], [event]
            )
        )

    return app


def check_prompt(ids: list[int], limits: Limits) -> list[int]:
    if not ids:
        raise RequestError(400, "the prompt is empty", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            400, f"the prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}", param="prompt"
        )
    return ids


def encode_prompt(tokenizer, text: str, limits: Limits) -> list[int]:  # type: ignore[no-untyped-def]
    """``<s>`` (when the tokenizer has one) + the prompt's tokens, as in training and evaluation."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return check_prompt([*bos, *tokenize(tokenizer, text)], limits)


def chat_prompt(tokenizer, body: ChatRequest, limits: Limits) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of a chat: the tokenizer's chat template when it has one; otherwise the messages'
    texts joined by newlines (the skill world's tokenizer has no template)."""
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return check_prompt(list(tokenizer(text, add_special_tokens=False)["input_ids"]), limits)
    return encode_prompt(tokenizer, "\n".join(m["content"] for m in messages), limits)
