"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with ``"stream":
true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), and vLLM's tokenizer routes ``POST /tokenize``, ``POST
/detokenize``, ``GET /tokenizer_info``. With an API key set, every route but ``/health`` needs
``Authorization: Bearer <key>``. Errors are OpenAI-style JSON: ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status for anything the client can fix, a JSON 500 for anything
else (never a traceback or a path of the server's filesystem).

What a client cannot do to the server:

- send a body past ``Limits.max_body_bytes``: the body is read as it streams (with a
  ``Content-Length`` or chunked) and refused with 413 at the limit; the rest is never read;
- keep rows running after it left: a non-streaming request watches its connection (the ASGI
  ``http.disconnect`` event) while the engine works and cancels its rows when the client goes
  away; streaming requests stop when a send fails or the client disconnects;
- half-queue a multi-prompt request: its prompts are queued all together or not at all (429);
- crash a handler with odd JSON: lone surrogates, integers past Python's 4,300-digit limit,
  ``NaN`` / ``Infinity`` literals, nesting deeper than ``MAX_JSON_DEPTH`` are all 400s.

While the engine shuts down every route answers 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lorafuse._checks import check_number
from lorafuse._data import decode, encode_chat
from lorafuse._data import encode_prompt as data_encode_prompt
from lorafuse._data import tokenize as data_tokenize
from lorafuse.serve.backend import Backend
from lorafuse.serve.compose import Composition, RequestError, Resolver, error_type
from lorafuse.serve.engine import SHUTTING_DOWN, Event, SamplingParams
from lorafuse.serve.engine import Request as GenerationRequest
from lorafuse.serve.logprobs import chat_logprobs, completion_logprobs
from lorafuse.serve.metrics import ServerMetrics
from lorafuse.serve.schemas import (
    MAX_SEED,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Common,
)

log = logging.getLogger("lorafuse.serve")

MAX_JSON_DEPTH = 32  # request bodies nest a few levels (messages → content → parts)
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """Per-request limits; breaking one is a 400 (413 for the body). Every limit is ≥ 1."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20
    max_prompts: int = 32

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_tokens",
            "max_tokens",
            "default_max_tokens",
            "max_body_bytes",
            "max_prompts",
        ):
            check_number(getattr(self, name), f"Limits.{name}", integer=True, low=1)
        if self.default_max_tokens > self.max_tokens:
            check_number(
                self.default_max_tokens, "Limits.default_max_tokens", integer=True, high=self.max_tokens
            )


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"Connection": "close"} if status == 413 else None  # the rest of the body is not read
    return JSONResponse(
        error_body(status, message, param=param, code=code), status_code=status, headers=headers
    )


def error_body(status: int, message: str, *, param: str | None = None, code: object = None) -> dict:
    """The OpenAI error object; the message is made safe to send as UTF-8 (no lone surrogates)."""
    safe = message.encode("utf-8", "replace").decode("utf-8")
    return {"error": {"message": safe, "type": error_type(status), "param": param, "code": code}}


class Guard:
    """ASGI middleware in front of every route: the API key, a declared ``Content-Length`` over the
    limit (413 before anything is read), 503 while shutting down, request counts by route and
    status (unknown paths counted as ``other``)."""

    def __init__(
        self, app: ASGIApp, *, backend: Backend, limits: Limits, api_key: str | None, metrics: ServerMetrics
    ) -> None:
        self.app = app
        self.backend = backend
        self.limits = limits
        self.api_key = api_key
        self.metrics = metrics

    def refusal(self, scope: Scope) -> JSONResponse | None:
        route = scope["path"]
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.backend.draining and route != "/metrics":
            return error_response(503, SHUTTING_DOWN)
        if self.api_key and route != "/health":
            header = headers.get(b"authorization", b"").decode("latin-1")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                return error_response(
                    401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key"
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            return error_response(413, f"request body is larger than {self.limits.max_body_bytes} bytes")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        refusal = self.refusal(scope)
        try:
            if refusal is not None:
                await refusal(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()


class EventStream(StreamingResponse):
    """Server-sent events of one generation; the generation is cancelled however the response
    ends (finished, the client gone, even before the first event was sent)."""

    def __init__(self, content: AsyncIterator[str], generation: GenerationRequest) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()  # no-op once finished


def check_json(value: object) -> None:
    """Refuse (400) what ``json.loads`` lets through but no handler should see: strings with lone
    surrogates (not Unicode text, the tokenizer cannot take them) and nesting past
    ``MAX_JSON_DEPTH``. Walks without recursion; names the field."""
    pending: list[tuple[object, str, int]] = [(value, "", 0)]
    while pending:
        item, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                field = where or "body"
                raise RequestError(
                    400,
                    f"{field}: not valid Unicode text: a lone surrogate (\\u{ord(item[exc.start]):04x}) "
                    f"at character {exc.start}",
                    param=where or None,
                ) from None
        elif isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                pending.append((key, where or "body", depth + 1))
                pending.append((child, path, depth + 1))
        elif isinstance(item, list):
            pending.extend(
                (child, f"{where}.{i}" if where else str(i), depth + 1) for i, child in enumerate(item)
            )


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (the body must have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect_or_leave(
    receive: Receive, started: list[tuple[GenerationRequest, asyncio.Queue[Event]]]
) -> list[Event] | None:
    """The final events of ``started`` requests, or ``None`` if the client disconnected first.
    Either way no row runs on: the first failure, a disconnect or a cancellation cancels them all."""
    tasks = [asyncio.ensure_future(collect(r, q)) for r, q in started]
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, _ = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                return None
            for task in done:
                pending.discard(task)
                task.result()  # raises the request's error
        return [t.result() for t in tasks]
    finally:
        gone.cancel()
        for task in tasks:
            task.cancel()
        for request, _ in started:
            request.cancel()  # no-op for finished rows


async def collect(request: GenerationRequest, queue: asyncio.Queue[Event]) -> Event:
    """Wait for one request's final event; its text is the concatenated text events."""
    parts: list[str] = []
    while True:
        event = await queue.get()
        if event.kind == "text":
            parts.append(event.text)
        elif event.kind == "error":
            raise RequestError(event.status, event.text)
        else:
            event.text = "".join(parts)
            return event


def build_app(
    backend: Backend,
    resolver: Resolver,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The FastAPI app around a started :class:`~lorafuse.serve.backend.Backend`: lorafuse's
    :class:`~lorafuse.serve.engine.Engine` or a vLLM forwarder (the caller starts and stops it)."""
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    tokenizer = backend.tokenizer
    base_name = resolver.base_name
    app = FastAPI(title="lorafuse", description="Many LoRA adapters and compositions on one base model")
    app.state.backend = backend
    app.state.metrics = metrics
    app.add_middleware(Guard, backend=backend, limits=limits, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def client_left(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it; counted as 499 (client closed request)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error in a request handler", exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log")

    @app.get("/health")
    async def health() -> dict[str, object]:
        return await backend.health()

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

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        """The body, read as it arrives and refused (413) as soon as it passes the limit."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"request body is larger than {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            raw = json.loads(body, parse_constant=_no_constant)
        except RecursionError:
            raise RequestError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            # ValueError: an integer past Python's digit limit, NaN / Infinity literals
            raise RequestError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RequestError(400, "the body must be a JSON object")
        check_json(raw)
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")
            raise RequestError(400, f"{where}: {message}" if where else message, param=where) from None

    vocab = backend.vocab_size
    texts: dict[int, str] = {}

    def encode(prompt: str | list[int], where: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            return encode_prompt(tokenizer, prompt, limits)
        bad = next((i for i, t in enumerate(prompt) if t >= vocab), None)
        if bad is not None:
            raise RequestError(
                400,
                f"{where}: token id {prompt[bad]} (item {bad}) is outside the vocabulary (0 … {vocab - 1})",
                param=where,
            )
        return check_prompt(list(prompt), limits)

    fast = getattr(tokenizer, "backend_tokenizer", None)
    word_level = fast is not None and type(fast.model).__name__ == "WordLevel"

    def token_text(token: int, spaced: bool = False) -> str:
        """One token's text as logprobs report it (special tokens included); a word-level
        vocabulary's words are joined by spaces, so ``spaced`` puts one before the word."""
        if token not in texts:
            if word_level:
                texts[token] = tokenizer.convert_ids_to_tokens(token)
            else:
                texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        return " " + texts[token] if spaced and word_level else texts[token]

    specials = set(getattr(tokenizer, "all_special_ids", []) or [])

    def text_of(ids: list[int]) -> str:
        """The text of token ids, special tokens left out (as a completion's text is)."""
        return decode(tokenizer, [t for t in ids if t not in specials])

    def kept_tokens(event: Event) -> list:
        """The generated tokens' logprobs, without those past a stop string (cut from the text)."""
        entries = list(event.logprobs or [])
        if event.finish_reason == "stop" and len(decode(tokenizer, event.token_ids)) > len(event.text):
            keep = 0
            while keep < len(entries) and len(decode(tokenizer, event.token_ids[:keep])) < len(event.text):
                keep += 1
            entries = entries[:keep]
        return entries

    def sampling(
        body: _Common,
        prompt_len: int,
        requested: int | None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        sample: int = 0,
    ) -> SamplingParams:
        max_tokens = requested if requested is not None else limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise RequestError(
                400, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}", param="max_tokens"
            )
        if prompt_len + max_tokens > backend.max_length:
            raise RequestError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the model's context of "
                f"{backend.max_length} tokens",
                param="max_tokens",
            )
        if body.min_tokens > max_tokens:
            raise RequestError(
                400, f"min_tokens ({body.min_tokens}) > max_tokens ({max_tokens})", param="min_tokens"
            )
        seed = None if body.seed is None else (body.seed + sample) % (MAX_SEED + 1)  # n samples differ
        return SamplingParams(
            max_tokens,
            body.temperature,
            body.top_p,
            seed,
            body.stop_strings,
            body.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def resolve(body: _Common) -> Composition:
        return await run_in_threadpool(resolver.resolve, body.model, body.compose)

    async def start(
        jobs: list[tuple[list[int], SamplingParams]], composition: Composition
    ) -> list[tuple[GenerationRequest, asyncio.Queue[Event]]]:
        """Start one generation per ``(ids, params)``, all or none (429 leaves nothing queued)."""
        loop = asyncio.get_running_loop()
        started = []
        for ids, params in jobs:
            queue: asyncio.Queue[Event] = asyncio.Queue()
            request = GenerationRequest(
                ids, composition, params, lambda ev, q=queue: loop.call_soon_threadsafe(q.put_nowait, ev)
            )
            started.append((request, queue))
        await backend.enqueue([r for r, _ in started])
        return started

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

    def choice(index: int, done: Event | None, logprobs: dict | None = None, **content: object) -> dict:
        finish = done.finish_reason if done else None
        return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        body = await read_body(http, CompletionRequest)
        assert isinstance(body, CompletionRequest)
        prompts = body.prompts
        if len(prompts) * body.n > limits.max_prompts:
            raise RequestError(
                400,
                f"{len(prompts)} prompts × n={body.n}; at most {limits.max_prompts} choices per request",
                param="n" if body.n > 1 else "prompt",
            )
        composition = await resolve(body)
        many = len(prompts) > 1
        encoded = [encode(p, f"prompt.{i}" if many else "prompt") for i, p in enumerate(prompts)]
        echoed = body.logprobs if body.echo else None
        jobs = [
            (
                ids,
                sampling(
                    body, len(ids), body.max_tokens, logprobs=body.logprobs, prompt_logprobs=echoed, sample=j
                ),
            )
            for ids in encoded
            for j in range(body.n)
        ]
        params = [p for _, p in jobs]
        rid, created, kind = f"cmpl-{uuid.uuid4().hex}", int(time.time()), "text_completion"
        if body.stream:
            ((request, queue),) = await start([(encoded[0], params[0])], composition)

            def chunk(text: str | None, done: Event | None, opening: bool) -> dict | None:
                if opening:
                    return None
                ends = [done] if done else []
                return envelope(kind, rid, created, body.model, [choice(0, done, text=text or "")], ends)

            return EventStream(stream(request, queue, chunk), request)
        events = await collect_or_leave(http.receive, await start(jobs, composition))
        if events is None:
            return Response(status_code=499)  # the client left; its rows were cancelled
        choices = []
        for i, event in enumerate(events):
            prompt = prompts[i // body.n]
            prompt_text = prompt if isinstance(prompt, str) else text_of(prompt)
            joint = " " if word_level and prompt_text and event.text else ""  # words are space-separated
            text = prompt_text + joint + event.text if body.echo else event.text
            logprobs = None
            if body.logprobs is not None:
                echoed_entries = event.prompt_logprobs or []
                entries = [*echoed_entries, *kept_tokens(event)]
                starts = {0, len(echoed_entries)}  # the prompt's first token, the completion's first
                start_at = 0 if body.echo else len(prompt_text)
                logprobs = completion_logprobs(
                    entries, lambda t, j, s=starts: token_text(t, j not in s), body.logprobs, start_at
                )
            choices.append(choice(i, event, logprobs, text=text))
        return JSONResponse(envelope(kind, rid, created, body.model, choices, events))

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Response:
        body = await read_body(http, ChatRequest)
        assert isinstance(body, ChatRequest)
        composition = await resolve(body)
        ids = chat_prompt(tokenizer, body, limits)
        top = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [
            (ids, sampling(body, len(ids), body.token_limit, logprobs=top, sample=j)) for j in range(body.n)
        ]
        if body.n > limits.max_prompts:
            raise RequestError(
                400, f"n={body.n}; at most {limits.max_prompts} choices per request", param="n"
            )
        params = jobs[0][1]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            ((request, queue),) = await start([(ids, params)], composition)

            def chunk(text: str | None, done: Event | None, opening: bool) -> dict:
                delta = (
                    {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
                )
                ends = [done] if done else []
                return envelope(
                    "chat.completion.chunk", rid, created, body.model, [choice(0, done, delta=delta)], ends
                )

            return EventStream(stream(request, queue, chunk), request)
        events = await collect_or_leave(http.receive, await start(jobs, composition))
        if events is None:
            return Response(status_code=499)  # the client left; its rows were cancelled
        choices = []
        for i, event in enumerate(events):
            message = {"role": "assistant", "content": event.text}
            spaced = lambda t, j: token_text(t, j > 0)  # noqa: E731
            logprobs = chat_logprobs(kept_tokens(event), spaced, top) if top is not None else None
            choices.append(choice(i, event, logprobs, message=message))
        return JSONResponse(envelope("chat.completion", rid, created, body.model, choices, events))

    @app.post("/tokenize")
    async def tokenize(http: Request) -> dict[str, object]:
        body = await read_body(http, TokenizeRequest)
        if body.model is not None:
            await run_in_threadpool(resolver.resolve, body.model, None)
        if body.add_special_tokens:
            ids = data_encode_prompt(tokenizer, body.prompt)
        else:
            ids = data_tokenize(tokenizer, body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.max_length}

    @app.post("/detokenize")
    async def detokenize(http: Request) -> dict[str, object]:
        body = await read_body(http, DetokenizeRequest)
        if body.model is not None:
            await run_in_threadpool(resolver.resolve, body.model, None)
        if body.tokens:
            encode(body.tokens, "tokens")  # ids past the vocabulary are a 400
        return {"prompt": text_of(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, object]:
        return tokenizer_description(tokenizer, backend.max_length, vocab)

    return app


def tokenizer_description(tokenizer, max_length: int, vocab: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What ``GET /tokenizer_info`` answers: the fields of a ``tokenizer_config.json`` a client
    needs to tokenize as the server does (vLLM's endpoint answers the same keys)."""
    info: dict[str, object] = {
        "tokenizer_class": type(tokenizer).__name__,
        "model_max_length": max_length,
        "vocab_size": vocab,
        "add_bos_token": getattr(tokenizer, "bos_token_id", None) is not None,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    for name in ("bos", "eos", "pad", "unk"):
        info[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
        info[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    return info


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
    return check_prompt(data_encode_prompt(tokenizer, text), limits)


def chat_prompt(tokenizer, body: ChatRequest, limits: Limits) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of a chat: the tokenizer's chat template when it has one; otherwise the messages'
    texts joined by newlines (the skill world's tokenizer has no template)."""
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        return check_prompt(encode_chat(tokenizer, messages), limits)
    return encode_prompt(tokenizer, "\n".join(m["content"] for m in messages), limits)
