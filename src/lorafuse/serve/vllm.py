"""lorafuse's API in front of a running vLLM OpenAI server (``lorafuse serve --engine vllm``).

vLLM batches many LoRAs but takes one adapter per request. Every static thing lorafuse serves is
exactly one adapter: a PEFT adapter, a low-rank compressed delta (its factors), and a weighted
composition ``Σ w_i ΔW_i`` — the ``cat`` of the LoRAs' ranks with the weights folded into ``A``
— which a static fusion (average, LoraHub) is too. So for each request :class:`VllmBackend`

1. takes the :class:`~lorafuse.serve.compose.Composition` the app resolved (same validation,
   limits and errors as the built-in engine);
2. materialises it once as a PEFT folder (``write``, lorafuse's export writer) under a cache
   folder, named by a hash of the folder's bytes (``lf-<hash>``): an LRU on disk with a size cap;
3. loads it into vLLM at run time (``POST /v1/load_lora_adapter``; vLLM must run with
   ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True --enable-lora``), keeping at most ``max_loaded``
   loaded (the least recently used idle one is unloaded first; an adapter evicted from disk is
   unloaded from vLLM before its folder goes);
4. sends the request's **token ids** (lorafuse tokenizes, so ``<s>`` and chat encoding are
   lorafuse's) to vLLM's ``/v1/completions`` with ``model`` set to the adapter's name, streams
   vLLM's token ids back and decodes them with lorafuse's tokenizer, so text, stop strings and
   the response's ``model`` (what the client asked for) are the built-in engine's.

Refused with a 400 that names the built-in engine: LoRA-Flow and learned-CAT fusions (weights
per token or per module), ``echo`` with ``logprobs`` (prompt log-probabilities), and adapters
of a rank above vLLM's ``--max-lora-rank``. vLLM unreachable is a 503, a vLLM failure a 502:
one line of JSON, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lorafuse._data import decode
from lorafuse.serve.compose import Composition, RequestError, public_text
from lorafuse.serve.engine import SHUTTING_DOWN, Event, QueueFull, Request, cut_text
from lorafuse.serve.logprobs import TokenLogprob
from lorafuse.serve.metrics import ServerMetrics
from lorafuse.serve.vllm_cache import AdapterCache, Cached

log = logging.getLogger("lorafuse.serve")

# The ranks vLLM's LoRAConfig accepts for --max-lora-rank (vLLM 0.6 onward).
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
BUILTIN = "serve it with lorafuse's own engine (`lorafuse serve` without `--engine vllm`)"

# write(composition, work) → (folder, rank): the composition as one PEFT adapter folder under
# the empty folder ``work``; raises RequestError (400, the reason) when it is not one adapter.
Writer = Callable[[Composition, Path], tuple[Path, int]]


def check_url(url: str) -> str:
    """``url`` without a trailing ``/`` (and without ``/v1``), or ``ValueError`` saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8001")
    base = url.rstrip("/")
    return base.removesuffix("/v1")


def _message(response: Any) -> str:
    """vLLM's error message from a response body (its JSON error object, or the text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


class VllmBackend:
    """A :class:`~lorafuse.serve.backend.Backend` forwarding to vLLM's OpenAI server at ``url``.

    ``tokenizer`` is the base model's (lorafuse tokenizes and decodes); ``write`` materialises a
    composition as one PEFT folder; ``cache_dir`` must be readable by vLLM at the same path (the
    same machine or a shared file system). ``model``: vLLM's name of the base model (default: the
    one model ``GET /v1/models`` lists without a parent). ``max_lora_rank`` is what vLLM was
    started with (``--max-lora-rank``): larger adapters are refused here, with a clear 400.
    """

    def __init__(
        self,
        url: str,
        tokenizer,  # type: ignore[no-untyped-def]
        *,
        write: Writer,
        cache_dir: str | Path,
        max_length: int,
        vocab_size: int,
        max_cache_bytes: int = 4 << 30,
        max_loaded: int = 64,
        max_lora_rank: int = 16,
        max_queue: int = 256,
        model: str | None = None,
        metrics: ServerMetrics | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
    ) -> None:
        self.url = check_url(url)
        self.tokenizer = tokenizer
        self.write = write
        self.cache = AdapterCache(cache_dir, max_cache_bytes)
        self.max_length = int(max_length)
        self._vocab_size = int(vocab_size)
        self.max_loaded = int(max_loaded)
        self.max_lora_rank = int(max_lora_rank)
        self.max_queue = int(max_queue)
        self.model = model
        self.metrics = metrics or ServerMetrics()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.eos = tokenizer.eos_token_id
        self._compositions: dict[tuple[tuple[str, float], ...], str] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._loop_state: tuple[asyncio.AbstractEventLoop, Any, asyncio.Lock] | None = None
        self._discovered = model is not None
        self.loads = 0
        self.unloads = 0
        self.evictions = 0
        self.rows: list[Request] = []

    # -- the Backend protocol -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def draining(self) -> bool:
        return self._stopping

    @property
    def queue_length(self) -> int:
        return 0  # vLLM queues; lorafuse only counts what it forwarded (``rows``)

    def start(self) -> VllmBackend:
        return self

    def describe(self) -> str:
        return (
            f"engine: vLLM at {self.url} (max LoRA rank {self.max_lora_rank}, at most {self.max_loaded} "
            f"adapters loaded, adapter cache {self.cache.root} ≤ {self.cache.max_bytes / 2**20:.0f} MiB, "
            f"{self.max_queue} requests in flight)"
        )

    def shutdown(self, grace: float = 0.0) -> None:
        """Refuse new requests (503); cancel those still running after ``grace`` seconds."""
        self._stopping = True
        tasks = list(self._tasks)
        if not tasks:
            return
        loop = tasks[0].get_loop()

        def cancel() -> None:
            for task in tasks:
                task.cancel()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.call_later(grace, cancel)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, grace, cancel)

    def stop(self, timeout: float = 10.0, grace: float = 0.0) -> None:
        self.shutdown(grace)

    async def health(self) -> dict[str, object]:
        client, _ = self._state()
        try:
            response = await client.get(self.url + "/health", timeout=self.connect_timeout)
        except Exception as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise RequestError(503, f"vLLM at {self.url} is not healthy (HTTP {response.status_code})")
        return {"status": "ok", "engine": "vllm", "running": len(self.rows), "waiting": 0}

    async def enqueue(self, requests: Sequence[Request]) -> None:
        if self._stopping:
            raise RequestError(503, SHUTTING_DOWN)
        if not requests:
            return
        if len(requests) > self.max_queue:
            raise RequestError(
                400, f"{len(requests)} prompts in one request; this server forwards at most {self.max_queue}"
            )
        if self._inflight + len(requests) > self.max_queue:
            raise QueueFull(self.max_queue)
        composition = requests[0].composition
        self._refuse(composition, requests)
        self._inflight += len(requests)
        try:
            model, cached = await self._model_for(composition)
        except BaseException:
            self._inflight -= len(requests)
            raise
        if cached is not None:
            cached.refs += len(requests)
        for request in requests:
            task = asyncio.ensure_future(self._generate(request, model, cached))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- what vLLM cannot serve -----------------------------------------------------------------
    def _refuse(self, composition: Composition, requests: Sequence[Request]) -> None:
        if composition.fusion is not None and composition.dynamic:
            raise RequestError(
                400,
                f"`{composition.label}` is a {composition.fusion.method} fusion: its weights change per "
                f"token or per module, which vLLM (one adapter per request) cannot compute; {BUILTIN}",
                code="not_servable_on_vllm",
            )
        if any(r.params.prompt_logprobs is not None for r in requests):
            raise RequestError(
                400,
                "`echo` with `logprobs` (the prompt's log-probabilities) is not forwarded to vLLM: its "
                f"CPU build crashes computing prompt log-probabilities with a LoRA; {BUILTIN}",
                param="echo",
                code="not_servable_on_vllm",
            )

    # -- adapters -------------------------------------------------------------------------------
    def _state(self) -> tuple[Any, asyncio.Lock]:
        """The HTTP client and the adapters' lock of the running event loop."""
        import httpx2

        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state[0] is not loop:
            timeout = httpx2.Timeout(self.read_timeout, connect=self.connect_timeout)
            limits = httpx2.Limits(max_connections=self.max_queue + 8, max_keepalive_connections=32)
            client = httpx2.AsyncClient(timeout=timeout, limits=limits)
            self._loop_state = (loop, client, asyncio.Lock())
        return self._loop_state[1], self._loop_state[2]

    def _unreachable(self, exc: BaseException) -> RequestError:
        reason = str(exc).strip() or type(exc).__name__
        return RequestError(
            503,
            f"vLLM at {self.url} is not reachable ({public_text(reason)}); start it, or check --vllm-url",
            code="vllm_unreachable",
        )

    async def _post(self, route: str, body: dict[str, Any]) -> Any:
        client, _ = self._state()
        try:
            return await client.post(self.url + route, json=body)
        except Exception as exc:
            raise self._unreachable(exc) from None

    async def _discover(self) -> None:
        """vLLM's base model name and context, and which of our adapters it has loaded already."""
        client, _ = self._state()
        try:
            response = await client.get(self.url + "/v1/models", timeout=self.connect_timeout + 5)
        except Exception as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise RequestError(
                502,
                f"vLLM at {self.url} answered GET /v1/models with {response.status_code}: "
                f"{public_text(_message(response))}",
            )
        data = [m for m in response.json().get("data", []) if isinstance(m, dict)]
        bases = [m for m in data if not m.get("parent")]
        if self.model is None:
            if not bases:
                raise RequestError(502, f"vLLM at {self.url} lists no base model in GET /v1/models")
            self.model = str(bases[0]["id"])
        for card in bases:
            if card.get("id") == self.model and isinstance(card.get("max_model_len"), int):
                self.max_length = min(self.max_length, int(card["max_model_len"]))
        for card in data:
            cached = self.cache.get(str(card.get("id")))
            if cached is not None and card.get("parent"):
                cached.loaded = True
        self._discovered = True

    async def _model_for(self, composition: Composition) -> tuple[str, Cached | None]:
        """vLLM's model name for ``composition`` (the base, or an adapter loaded for it)."""
        _, lock = self._state()
        async with lock:
            if not self._discovered:
                await self._discover()
            assert self.model is not None
            if not composition.parts:
                return self.model, None
            key = tuple((p.key, p.weight) for p in composition.parts)
            name = self._compositions.get(key)
            cached = self.cache.get(name) if name else None
            if cached is None:
                cached = await asyncio.to_thread(self._materialise, composition)
                self._compositions[key] = cached.name
            if cached.rank > self.max_lora_rank:
                raise RequestError(
                    400,
                    f"`{composition.label}` is one adapter of rank {cached.rank} on vLLM (a weighted "
                    f"composition is the cat of its LoRAs' ranks), above the --max-lora-rank "
                    f"{self.max_lora_rank} vLLM runs with: start vLLM with a larger --max-lora-rank (and "
                    f"pass it as --vllm-max-lora-rank), or {BUILTIN}",
                    code="not_servable_on_vllm",
                )
            self.cache.touch(cached.name)
            if not cached.loaded:
                await self._load(cached, composition.label)
            for victim in self.cache.over(keep=cached):
                if victim.loaded:
                    await self._unload(victim)
                self.cache.remove(victim)
                self.evictions += 1
                self._compositions = {k: v for k, v in self._compositions.items() if v != victim.name}
            self._report()
            return cached.name, cached

    def _materialise(self, composition: Composition) -> Cached:
        """Write ``composition`` as one adapter into the cache (in a worker thread)."""
        work = self.cache.work_folder()
        try:
            folder, rank = self.write(composition, work)
            return self.cache.add(folder, rank)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _load(self, cached: Cached, label: str) -> None:
        """Load ``cached`` into vLLM, unloading idle ones first to keep ``max_loaded`` (those in
        use stay: vLLM then holds more until they finish, see :meth:`_trim`)."""
        loaded = [c for c in self.cache.entries.values() if c.loaded]
        for victim in loaded[: max(0, len(loaded) - self.max_loaded + 1)]:
            if victim.refs == 0:
                await self._unload(victim)
        response = await self._post(
            "/v1/load_lora_adapter", {"lora_name": cached.name, "lora_path": str(cached.path)}
        )
        message = "" if response.status_code == 200 else _message(response)
        if response.status_code == 200 or "already been loaded" in message:
            cached.loaded = True
            self.loads += 1
            return
        if response.status_code in (404, 405):
            raise RequestError(
                502,
                f"vLLM at {self.url} does not load adapters at run time (POST /v1/load_lora_adapter: "
                f"{response.status_code}); start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                "--enable-lora",
                code="vllm_error",
            )
        raise RequestError(
            502,
            f"vLLM refused the adapter for `{label}` ({response.status_code}): {public_text(message)}",
            code="vllm_error",
        )

    async def _unload(self, cached: Cached) -> None:
        cached.loaded = False
        self.unloads += 1
        try:
            response = await self._post("/v1/unload_lora_adapter", {"lora_name": cached.name})
        except RequestError:
            return  # vLLM is gone: nothing is loaded there any more
        if response.status_code not in (200, 400, 404):
            log.warning("vLLM did not unload %s: %s", cached.name, _message(response))

    def _report(self) -> None:
        loaded = sum(1 for c in self.cache.entries.values() if c.loaded)
        self.metrics.adapters(loaded, self.loads, self.evictions)
        self.metrics.state(len(self.rows), len({r.composition.label for r in self.rows}), 0)

    # -- one row --------------------------------------------------------------------------------
    def _body(self, request: Request, model: str) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {
            "model": model,
            "prompt": list(request.prompt_ids),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "min_tokens": p.min_tokens,
            "stream": True,
            "return_token_ids": True,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:  # vLLM stops there too; lorafuse cuts its own decoded text (as the engine does)
            body["stop"] = list(p.stop)
            body["include_stop_str_in_output"] = True
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
            body["return_tokens_as_token_ids"] = True
        return body

    async def _generate(self, request: Request, model: str, cached: Cached | None) -> None:
        self.rows.append(request)
        reason = "error"
        try:
            reason = await self._forward(request, model, cached, retry=True)
        except asyncio.CancelledError:
            reason = "shutdown"
            if not request.cancelled:
                request.emit(Event("error", text=SHUTTING_DOWN, status=503))
        except RequestError as exc:
            request.emit(Event("error", text=exc.message, status=exc.status))
        except Exception as exc:  # never a traceback to the client
            log.warning("forwarding to vLLM failed", exc_info=exc)
            text = f"forwarding to vLLM failed ({type(exc).__name__}: {public_text(str(exc))})"
            request.emit(Event("error", text=text, status=502))
        finally:
            self._inflight -= 1
            if cached is not None:
                cached.refs -= 1
            with contextlib.suppress(ValueError):
                self.rows.remove(request)
            self.metrics.finished(request, reason)
            self._report()
        if not self._stopping:
            await self._trim()

    async def _trim(self) -> None:
        """Unload idle adapters past ``max_loaded`` (loaded beyond it while all were in use)."""
        loaded = [c for c in self.cache.entries.values() if c.loaded]
        if len(loaded) <= self.max_loaded:
            return
        _, lock = self._state()
        async with lock:
            loaded = [c for c in self.cache.entries.values() if c.loaded]
            idle = [c for c in loaded if c.refs == 0]
            for victim in idle[: max(0, len(loaded) - self.max_loaded)]:
                await self._unload(victim)
            self._report()

    async def _forward(self, request: Request, model: str, cached: Cached | None, *, retry: bool) -> str:
        """Stream one row from vLLM; the finish reason. A vLLM that lost the adapter (restarted)
        gets it loaded again once."""
        client, lock = self._state()
        p = request.params
        try:
            async with client.stream(
                "POST", self.url + "/v1/completions", json=self._body(request, model)
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    message = _message(resp)
                    if resp.status_code == 404 and cached is not None and retry:
                        async with lock:
                            cached.loaded = False
                            await self._load(cached, request.composition.label)
                        return await self._forward(request, model, cached, retry=False)
                    status = 400 if resp.status_code == 400 else 502
                    raise RequestError(status, f"vLLM: {public_text(message)}", code="vllm_error")
                finish = "length"
                async for line in resp.aiter_lines():
                    if request.cancelled:
                        return "cancelled"
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk or chunk.get("object") == "error":
                        raise RequestError(502, f"vLLM: {public_text(_message_of(chunk))}", code="vllm_error")
                    done = self._chunk(request, chunk)
                    if done is not None:
                        finish = done
                        break
        except RequestError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise RequestError(502, f"vLLM sent a stream lorafuse cannot read ({exc})") from None
            raise self._unreachable(exc) from None
        if request.cancelled:
            return "cancelled"
        if len(request.generated) >= p.max_tokens:
            finish = "length"
        self._send(request, len(request.text))
        request.emit(request.done_event(finish))
        return finish

    def _chunk(self, request: Request, chunk: dict[str, Any]) -> str | None:
        """Take one streamed chunk; the finish reason once the row is done."""
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        ids = choice.get("token_ids")
        if ids is None:
            raise RequestError(
                502,
                f"vLLM at {self.url} does not return token ids (`return_token_ids`, vLLM ≥ 0.10.2); "
                f"upgrade vLLM or {BUILTIN}",
                code="vllm_error",
            )
        entries = self._logprobs(choice.get("logprobs"), request.params.logprobs)
        for i, token in enumerate(ids or []):
            token = int(token)
            if request.first_token is None:
                request.first_token = time.monotonic()
            if token == self.eos:
                return "stop"
            request.generated.append(token)
            if i < len(entries):
                request.logprobs.append(entries[i])
            request.text, ready, stopped = cut_text(
                decode(self.tokenizer, request.generated), request.params.stop
            )
            self._send(request, ready)
            if stopped:
                return "stop"
            if len(request.generated) >= request.params.max_tokens:
                return "length"
        reason = choice.get("finish_reason")
        return str(reason) if reason else None

    @staticmethod
    def _logprobs(raw: object, k: int | None) -> list[TokenLogprob]:
        """vLLM's legacy logprobs object (tokens as ``token_id:N``) as lorafuse's records."""
        if k is None or not isinstance(raw, dict):
            return []
        out = []
        tops = raw.get("top_logprobs") or []
        for j, (token, logprob) in enumerate(
            zip(raw.get("tokens") or [], raw.get("token_logprobs") or [], strict=False)
        ):
            top_raw = tops[j] if j < len(tops) and isinstance(tops[j], dict) else {}
            top = sorted(((_token_id(t), float(v)) for t, v in top_raw.items()), key=lambda tv: -tv[1])[:k]
            out.append(
                TokenLogprob(_token_id(token), None if logprob is None else float(logprob), tuple(top))
            )
        return out

    @staticmethod
    def _send(request: Request, upto: int) -> None:
        if upto > request.sent:
            request.emit(Event("text", text=request.text[request.sent : upto]))
            request.sent = upto


def _token_id(token: object) -> int:
    text = str(token)
    return int(text.removeprefix("token_id:"))


def _message_of(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(chunk.get("message") or chunk)
