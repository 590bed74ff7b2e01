"""Continuous batching over many adapters: one thread runs the model, requests come and go.

Every iteration the engine (1) admits waiting requests up to ``max_batch`` rows, loads the
adapters they need into the :class:`~lorafuse.runtime.pool.AdapterPool` (LRU-evicting unused
ones past ``max_loaded``) and prefills them together; (2) merges their KV cache into the running
batch (left padding, explicit position ids, so rows of any length share one cache); (3) decodes
one token for every running row, each with its own adapter, weighted combination or fusion; (4)
streams new text to each request and drops finished rows from the batch and the cache.

A request that fails while being prepared (an adapter that does not load) or in its prefill
fails alone; the batch goes on. A cancelled request (its client went away) leaves the waiting
queue or the batch at the next step. :meth:`Engine.shutdown` stops admitting, refuses what is
still waiting, lets running rows finish for a grace period and cancels the rest.

Torch's intra-op threads are set once, in the engine thread, which is the only thread that runs
torch operations while serving (``threads``; see :func:`default_threads`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lorafuse._checks import check_number
from lorafuse._data import decode
from lorafuse.errors import LorafuseError
from lorafuse.runtime import LayerInputSource
from lorafuse.runtime.pool import AdapterPool, Allocation, BatchPlan
from lorafuse.serve.compose import Composition, RequestError, public_text
from lorafuse.serve.dynamic import fusion_rows
from lorafuse.serve.logprobs import TokenLogprob, records

log = logging.getLogger("lorafuse.serve")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (temperature 0 = greedy)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end-of-sequence is banned until this many tokens (vLLM's min_tokens)
    logprobs: int | None = None  # record each generated token's log-probability and this many top ones
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (one full-width prefill)


@dataclass
class Event:
    """What the engine tells a request: ``kind`` = "text" | "done" | "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (past a stop string too)
    logprobs: list[TokenLogprob] | None = None  # one per generated token
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (the first: logprob None)


@dataclass
class Request:
    """One sequence to generate. ``emit`` is called from the engine thread."""

    prompt_ids: list[int]
    composition: Composition
    params: SamplingParams
    emit: Callable[[Event], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    arrived: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    allocations: list[Allocation] = field(default_factory=list)
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending: TokenLogprob | None = None  # the last sampled token's log-probabilities

    def cancel(self) -> None:
        """Stop generating (the client went away); the row leaves the batch at the next step."""
        self.cancelled = True

    def done_event(self, reason: str) -> Event:
        """The last event of this request: why it finished, its token counts and log-probabilities."""
        return Event(
            "done",
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            token_ids=list(self.generated),
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=list(self.prompt_logprobs) if self.params.prompt_logprobs is not None else None,
        )


class QueueFull(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(429, f"the server has {limit} requests waiting (its limit); retry later")


SHUTTING_DOWN = "the server is shutting down"


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (``cpu.max``, as set by ``docker --cpus``) when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    """Intra-op threads of the engine by default: the available cores less one, left to the HTTP
    side (event loop, tokenizer, JSON), and at least one. More threads than cores oversubscribe
    them and collapse throughput on small models (spinning OpenMP workers starve the HTTP side)."""
    return max(1, available_cores() - 1)


class EngineMetrics:
    """Hooks the engine calls; the server's Prometheus metrics subclass this (no-ops here)."""

    def batch(self, rows: int, distinct: int, queue: int) -> None:
        """One batched decoding step of ``rows`` rows."""

    def state(self, rows: int, distinct: int, queue: int) -> None:
        """The current batch and queue, after every step and when the engine goes idle."""

    def finished(self, request: Request, reason: str) -> None:
        """A request left (``stop``, ``length``, ``cancelled``, ``error``, ``shutdown``)."""

    def adapters(self, loaded: int, loads: int, evictions: int) -> None:
        """The adapter pool after an admission."""

    def threads(self, count: int) -> None:
        """The intra-op threads the engine thread runs with."""


class Engine:
    """Runs ``model`` (with an :class:`AdapterPool`) in a background thread for many requests."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,  # type: ignore[no-untyped-def]
        pool: AdapterPool,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        max_loaded: int = 64,
        max_length: int | None = None,
        metrics: EngineMetrics | None = None,
        threads: int | None = None,
    ) -> None:
        """``threads``: torch intra-op threads set in the engine thread (``None``: leave torch's
        setting alone). ``max_batch``, ``max_queue`` and ``max_loaded`` must be at least 1."""
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_batch = int(check_number(max_batch, "max_batch", integer=True, low=1))
        self.max_queue = int(check_number(max_queue, "max_queue", integer=True, low=1))
        self.max_loaded = int(check_number(max_loaded, "max_loaded", integer=True, low=1))
        self.threads = None if threads is None else int(check_number(threads, "threads", integer=True, low=1))
        self.threads_in_use: int | None = None  # what torch reports inside the engine thread
        config = getattr(model, "config", None)
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.metrics = metrics or EngineMetrics()
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline = 0.0  # when stopping: running rows are cancelled after this time
        # the running batch
        self.rows: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # (B, L) 1 = real token
        self._positions: Tensor | None = None  # (B,) position id of the next token
        self._last: Tensor | None = None  # (B,) last token of each row
        self._plan_rows: LayerInputSource | None = None
        self._plan: BatchPlan | None = None
        self.steps = 0

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="lorafuse-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop admitting (``submit`` answers 503), refuse waiting requests with a 503 error event
        now, let running rows finish for up to ``grace`` seconds and then cancel them with a 503
        error event; the engine thread then ends. Returns at once (see :meth:`stop`)."""
        grace = float(check_number(grace, "grace", low=0))
        with self._cond:
            deadline = time.monotonic() + grace
            self._deadline = min(self._deadline, deadline) if self._stopping else deadline
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0, grace: float = 0.0) -> None:
        """:meth:`shutdown` with ``grace``, then wait up to ``grace + timeout`` s for the thread."""
        self.shutdown(grace)
        if self._thread is not None:
            self._thread.join(grace + timeout)

    @property
    def draining(self) -> bool:
        """Whether :meth:`shutdown` was called (new requests are refused)."""
        return self._stopping

    def submit(self, request: Request) -> None:
        """Queue ``request``; raises :class:`QueueFull` past ``max_queue`` waiting requests."""
        self.submit_all([request])

    def submit_all(self, requests: Sequence[Request]) -> None:
        """Queue all of ``requests`` or none: raises :class:`QueueFull` (nothing queued) when they
        do not all fit under ``max_queue``, or a 503 :class:`RequestError` while shutting down."""
        with self._cond:
            if self._stopping:
                raise RequestError(503, SHUTTING_DOWN)
            if len(requests) > self.max_queue:
                raise RequestError(
                    400,
                    f"{len(requests)} prompts in one request; this server queues at most {self.max_queue}",
                )
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.extend(requests)
            self._cond.notify()
        self._report()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the tokenizer's and the model's vocabulary, the smaller."""
        return vocabulary_size(self.model, self.tokenizer)

    async def enqueue(self, requests: Sequence[Request]) -> None:
        """The :class:`~lorafuse.serve.backend.Backend` entry: :meth:`submit_all` (adapters load
        in the engine thread; a failure there is an error event of that request)."""
        self.submit_all(requests)

    def describe(self) -> str:
        """What the engine runs with, for the server's first lines."""
        cores = available_cores()
        threads = self.threads if self.threads is not None else default_threads()
        over = "  (more threads than cores: oversubscribed)" if threads > cores else ""
        return (
            f"engine: {threads} intra-op thread(s) of {cores} available core(s), max batch "
            f"{self.max_batch}, queue {self.max_queue}{over}"
        )

    async def health(self) -> dict[str, object]:
        if not self.alive:
            raise RequestError(503, "the engine is not running")
        return {"status": "ok", "running": len(self.rows), "waiting": self.queue_length}

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def _report(self) -> None:
        rows = list(self.rows)
        self.metrics.state(len(rows), len({r.composition.label for r in rows}), len(self._waiting))

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's OpenMP team; the only torch user
        self.threads_in_use = torch.get_num_threads()
        self.metrics.threads(self.threads_in_use)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.rows:
                    self._cond.wait()
                dropped = [r for r in self._waiting if r.cancelled]
                if dropped:  # their clients went away while they waited
                    self._waiting = deque(r for r in self._waiting if not r.cancelled)
                if self._stopping:
                    refused, admitted = list(self._waiting), []
                    self._waiting.clear()
                else:
                    refused = []
                    room = self.max_batch - len(self.rows)
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for request in dropped:
                self.metrics.finished(request, "cancelled")
            for request in refused:
                self._refuse(request)
            if self._stopping and (not self.rows or time.monotonic() >= self._deadline):
                break
            try:
                if admitted:
                    self._admit(admitted)
                if self.rows:
                    self._decode()
            except Exception as exc:  # never let the engine thread die
                log.exception("engine step failed")
                self._fail_all(exc)
            self._report()
        rows, self.rows = self.rows, []
        for request in rows:
            self._refuse(request)
        self._select([])
        self._report()

    def _refuse(self, request: Request) -> None:
        """End ``request`` because the server is shutting down (a 503 error event)."""
        self._release(request)
        self.metrics.finished(request, "shutdown")
        if not request.cancelled:
            request.emit(Event("error", text=SHUTTING_DOWN, status=503))

    def _admit(self, requests: list[Request]) -> None:
        ready = []
        for request in requests:
            if request.cancelled:
                continue
            try:
                self._prepare(request)
                ready.append(request)
            except Exception as exc:
                self._fail(request, exc)
        self.pool.evict(self.max_loaded)
        self.metrics.adapters(len(self.pool), self.pool.stats.loads, self.pool.stats.evictions)
        for group in prefill_groups(ready):
            try:
                self._prefill(group)
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0], exc)
                    continue
                log.warning("prefill of %d requests failed; retrying them one by one", len(group))
                for request in group:  # only the request that fails fails; the running batch goes on
                    try:
                        self._prefill([request])
                    except Exception as exc_one:
                        self._fail(request, exc_one)

    def _prepare(self, request: Request) -> None:
        """Load the request's adapters into the pool and pin them while it runs."""
        for part in request.composition.parts:
            if part.key not in self.pool:
                lora = part.load()
                try:
                    self.pool.add(part.key, lora)
                except LorafuseError as exc:
                    message = public_text(str(exc))
                    raise RequestError(400, f"`{request.composition.label}`: {message}") from None
            allocation = self.pool.touch(part.key)
            allocation.refs += 1
            request.allocations.append(allocation)
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)

    def _make_plan(self, rows: Sequence[Request]) -> tuple[BatchPlan | None, LayerInputSource | None]:
        """The pool plan for ``rows`` and, when some use learned fusions, their hooks (installed)."""
        if not any(r.composition.parts for r in rows):
            return None, None  # every row is the base model
        plan = self.pool.plan([[(p.key, p.weight) for p in r.composition.parts] for r in rows])
        groups: dict[str, tuple] = {}
        for b, r in enumerate(rows):
            if r.composition.dynamic:
                key = r.composition.fusion_key or r.composition.label
                groups.setdefault(key, (r.composition.fusion, []))[1].append(b)
        if not groups:
            return plan, None
        plan.dynamic = fusion_rows(self.model, list(groups.values()))
        return plan, plan.dynamic

    def _set_batch_plan(self) -> None:
        if self._plan_rows is not None:
            self._plan_rows.remove()
        self._plan, self._plan_rows = self._make_plan(self.rows)

    def _prefill(self, requests: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)  # (n, L) left-padded
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L)
        plan, rows_source = self._make_plan(requests)
        every_position = any(r.params.prompt_logprobs is not None for r in requests)
        try:
            with self.pool.use(plan):
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    past_key_values=DynamicCache(),
                    use_cache=True,
                    logits_to_keep=0 if every_position else 1,
                )
        finally:
            if rows_source is not None:
                rows_source.remove()
        if every_position:
            for i, r in enumerate(requests):
                if r.params.prompt_logprobs is not None:
                    n = len(r.prompt_ids)
                    logits = out.logits[i, width - n : width - 1]  # (n-1, V): position t predicts t+1
                    chosen = torch.tensor(r.prompt_ids[1:], dtype=torch.long)
                    first = TokenLogprob(r.prompt_ids[0], None)
                    r.prompt_logprobs = [first, *records(logits, chosen, r.params.prompt_logprobs)]
        tokens = self._sample(out.logits[:, -1], requests)  # (n,)
        start = len(self.rows)
        self._merge(requests, out.past_key_values, mask, mask.sum(-1), tokens.to(self.device))
        self._after_step(tokens, start)

    def _merge(
        self, requests: list[Request], cache: DynamicCache, mask: Tensor, positions: Tensor, last: Tensor
    ) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        mask = mask.to(self.device)
        if not self.rows:
            self.rows, self._cache, self._mask = list(requests), cache, mask
            self._positions, self._last = positions.to(self.device), last
        else:
            assert self._cache is not None and self._mask is not None
            length = max(self._mask.shape[1], mask.shape[1])
            for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
                for name in ("keys", "values"):
                    a, b = getattr(old_layer, name), getattr(new_layer, name)  # (B, H, L, D)
                    setattr(old_layer, name, torch.cat([_left_pad(a, length, 2), _left_pad(b, length, 2)], 0))
            self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)], 0)
            self._positions = torch.cat([self._positions, positions.to(self.device)])  # type: ignore[list-item]
            self._last = torch.cat([self._last, last])  # type: ignore[list-item]
            self.rows.extend(requests)
        self._set_batch_plan()

    def _decode(self) -> None:
        assert self._mask is not None and self._positions is not None and self._last is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], 1)  # (B, L+1)
        distinct = len({r.composition.label for r in self.rows})
        self.metrics.batch(len(self.rows), distinct, len(self._waiting))
        with self.pool.use(self._plan):
            out = self.model(
                input_ids=self._last.unsqueeze(1),
                attention_mask=self._mask,
                position_ids=self._positions.unsqueeze(1),
                past_key_values=self._cache,
                use_cache=True,
            )
        self._cache = out.past_key_values
        self._positions = self._positions + 1
        tokens = self._sample(out.logits[:, -1], self.rows)
        self.steps += 1
        self._after_step(tokens)

    # -- tokens ---------------------------------------------------------------------------------
    def _sample(self, logits: Tensor, requests: Sequence[Request]) -> Tensor:
        """Next token per row: argmax for temperature 0, else top-p sampling with the row's seed."""
        logits = logits.float()  # (B, V)
        for i, r in enumerate(requests):
            if len(r.generated) < r.params.min_tokens and self.eos is not None:
                logits[i, self.eos] = float("-inf")
        tokens = logits.argmax(-1)  # (B,)
        for i, r in enumerate(requests):
            if r.params.temperature > 0:
                probs = torch.softmax(logits[i] / r.params.temperature, -1)  # (V,)
                if r.params.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    keep = sorted_probs.cumsum(0) - sorted_probs < r.params.top_p
                    probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
                tokens[i] = torch.multinomial(probs.cpu(), 1, generator=r.generator).item()
        for i, r in enumerate(requests):
            if r.params.logprobs is not None:
                (r.pending,) = records(logits[i : i + 1], tokens[i : i + 1], r.params.logprobs)
        return tokens

    def _after_step(self, tokens: Tensor, start: int = 0) -> None:
        """Record the new tokens of rows ``start…``, stream text, and drop finished rows."""
        assert self._last is not None
        self._last[start:] = tokens.to(self.device)
        keep = list(range(start))
        for i, token in enumerate(tokens.tolist(), start):
            r = self.rows[i]
            reason = self._advance(r, token, i)
            if reason is None:
                keep.append(i)
            else:
                self._finish(r, reason)
        if len(keep) < len(self.rows):
            self._select(keep)

    def _advance(self, r: Request, token: int, row: int) -> str | None:
        if r.cancelled:
            return "cancelled"
        if r.params.max_tokens == 0:  # the prompt only (echo with logprobs): nothing is generated
            return "length"
        if r.first_token is None:
            r.first_token = time.monotonic()
        if token == self.eos:
            return "stop"
        r.generated.append(token)
        if r.pending is not None:
            r.logprobs.append(r.pending)
            r.pending = None
        r.text, ready, stopped = cut_text(decode(self.tokenizer, r.generated), r.params.stop)
        self._send(r, ready)
        if stopped:
            return "stop"
        assert self._positions is not None
        if len(r.generated) >= r.params.max_tokens or int(self._positions[row]) + 1 >= self.max_length:
            return "length"
        return None

    def _send(self, r: Request, upto: int) -> None:
        if upto > r.sent:
            r.emit(Event("text", text=r.text[r.sent : upto]))
            r.sent = upto

    @staticmethod
    def _release(r: Request) -> None:
        """Unpin the request's adapters (the pool may evict them again)."""
        for allocation in r.allocations:
            allocation.refs -= 1
        r.allocations = []

    def _finish(self, r: Request, reason: str) -> None:
        self._send(r, len(r.text))
        self._release(r)
        self.metrics.finished(r, reason)
        if reason != "cancelled":
            r.emit(r.done_event(reason))

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` in the batch, the cache and the masks; trim all-padding columns."""
        if not keep:
            self.rows, self._cache, self._mask, self._positions, self._last = [], None, None, None, None
            self._set_batch_plan()
            return
        index = torch.tensor(keep, device=self.device)
        assert self._cache is not None and self._mask is not None
        self._mask = self._mask.index_select(0, index)
        first = int(self._mask.any(0).float().argmax())  # leading columns that are padding in every row
        for layer in self._cache.layers:
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name).index_select(0, index)[:, :, first:])
        self._mask = self._mask[:, first:]
        self._positions = self._positions.index_select(0, index)  # type: ignore[union-attr]
        self._last = self._last.index_select(0, index)  # type: ignore[union-attr]
        self.rows = [self.rows[i] for i in keep]
        self._set_batch_plan()

    def _fail(self, request: Request, exc: Exception) -> None:
        self._release(request)
        if isinstance(exc, RequestError):
            request.emit(Event("error", text=exc.message, status=exc.status))
        else:
            log.warning("request %s failed: %s: %s", request.id, type(exc).__name__, exc, exc_info=exc)
            text = f"internal error while generating ({type(exc).__name__}: {public_text(str(exc))})"
            request.emit(Event("error", text=text, status=500))
        self.metrics.finished(request, "error")

    def _fail_all(self, exc: Exception) -> None:
        rows, self.rows = self.rows, []
        for request in rows:
            self._fail(request, exc)
        self._select([])


def cut_text(text: str, stop: Sequence[str]) -> tuple[str, int, bool]:
    """A row's text so far → ``(text, ready, stopped)``: the text cut before the first stop string
    (``stopped``), and how many of its characters can be sent now (not those that may start a
    stop string, nor an incomplete UTF-8 sequence's replacement character)."""
    stop_at = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    if stop_at >= 0:
        return text[:stop_at], stop_at, True
    hold = max((len(s) - 1 for s in stop), default=0)  # a stop string may be starting
    ready = len(text) - hold
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
        ready = min(ready, len(text) - 1)
    return text, ready, False


def vocabulary_size(model, tokenizer) -> int:  # type: ignore[no-untyped-def]
    """Token ids a prompt may hold: the tokenizer's and the model's vocabulary, the smaller."""
    size = len(tokenizer)
    config_size = getattr(getattr(model, "config", None), "vocab_size", None)
    return min(size, int(config_size)) if config_size else size


PROMPT_LOGPROB_TOKENS = 8192  # padded prompt positions per prefill whose logits are all kept


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests to prefill together: all that need only the last position's logits in one group;
    those that need their prompt's log-probabilities (every position's logits, ``(rows, width,
    vocab)``) in groups of at most :data:`PROMPT_LOGPROB_TOKENS` padded positions (one at least)."""
    plain = [r for r in requests if r.params.prompt_logprobs is None]
    groups = [plain] if plain else []
    group: list[Request] = []
    for r in sorted(
        (r for r in requests if r.params.prompt_logprobs is not None), key=lambda r: len(r.prompt_ids)
    ):
        width = max(len(r.prompt_ids), *(len(q.prompt_ids) for q in group)) if group else len(r.prompt_ids)
        if group and width * (len(group) + 1) > PROMPT_LOGPROB_TOKENS:
            groups.append(group)
            group = []
        group.append(r)
    if group:
        groups.append(group)
    return groups


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)
