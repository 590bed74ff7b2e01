"""The continuous-batching engine on Llama, Qwen2, Mistral and GPT-2: rows join and leave a running
batch (KV caches of different lengths merged), and every answer equals batch-1 generation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorafuse import attach, detach, load_lora
from lorafuse._checks import InvalidValueError
from lorafuse.runtime.pool import AdapterPool
from lorafuse.serve.compose import Composition, Part, RequestError
from lorafuse.serve.engine import Engine, EngineMetrics, Event, QueueFull, Request, SamplingParams
from lorafuse.tiny import random_peft_adapter, tiny_causal_lm, word_tokenizer


def _reference(model: torch.nn.Module, prompt: list[int], adapter: Path | None, n: int) -> list[int]:
    handle = attach(model, {"a": load_lora(adapter)}) if adapter else None
    try:
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
        return out[0, len(prompt) :].tolist()
    finally:
        if handle is not None:
            detach(model)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_rows_join_and_leave_and_match_batch_one(kind: str, tmp_path: Path) -> None:
    model = tiny_causal_lm(kind, seed=0)
    adapters = [random_peft_adapter(model, tmp_path / f"a{i}", seed=10 + i, r=2 + i) for i in range(3)]
    engine_model = tiny_causal_lm(kind, seed=0)
    engine = Engine(engine_model, word_tokenizer(), AdapterPool(engine_model), max_batch=4).start()
    g = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(10):  # more requests than rows: later ones join while others run
        prompt = [
            1,
            *torch.randint(3, 128, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist(),
        ]
        adapter = adapters[i % 3] if i % 4 else None  # every 4th request: the base model
        jobs.append((prompt, adapter, 3 + (i * 5) % 9))
    finished = threading.Semaphore(0)
    requests = []
    try:
        for prompt, adapter, n in jobs:
            parts = (Part(str(adapter), lambda adapter=adapter: load_lora(adapter), 1.0),) if adapter else ()
            request = Request(
                prompt,
                Composition(str(adapter), parts),
                SamplingParams(max_tokens=n, min_tokens=n),
                lambda e: finished.release() if e.kind != "text" else None,
            )
            requests.append(request)
            engine.submit(request)
        for _ in requests:
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    for (prompt, adapter, n), request in zip(jobs, requests, strict=True):
        assert request.generated == _reference(model, prompt, adapter, n), (kind, adapter, n)
    assert engine.steps < sum(n for _, _, n in jobs)  # rows really shared decoding steps


def test_cancelled_row_leaves_the_batch(tmp_path: Path) -> None:
    model = tiny_causal_lm("llama")
    engine = Engine(model, word_tokenizer(), AdapterPool(model), max_batch=4).start()
    events: list[Event] = []
    first = threading.Event()

    def emit(event: Event) -> None:
        events.append(event)
        first.set()

    long = Request([1, 5, 6], Composition("base"), SamplingParams(max_tokens=200, min_tokens=200), emit)
    try:
        engine.submit(long)
        assert first.wait(30)
        long.cancel()
        for _ in range(200):
            if not engine.rows:
                break
            threading.Event().wait(0.01)
        assert not engine.rows
        assert len(long.generated) < 200 and not any(e.kind == "done" for e in events)
    finally:
        engine.stop()


class _Recorder(EngineMetrics):
    """Keeps the last gauge values and every finish reason the engine reports."""

    def __init__(self) -> None:
        self.last_state: tuple[int, int, int] | None = None
        self.reasons: list[str] = []
        self.thread_count: int | None = None

    def state(self, rows: int, distinct: int, queue: int) -> None:
        self.last_state = (rows, distinct, queue)

    def finished(self, request: Request, reason: str) -> None:
        self.reasons.append(reason)

    def threads(self, count: int) -> None:
        self.thread_count = count


def _long(emit: Callable[[Event], None], n: int = 200) -> Request:
    return Request([1, 5, 6], Composition("base"), SamplingParams(max_tokens=n, min_tokens=n), emit)


def _until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll ``condition`` (every 10 ms) until it holds or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize(
    ("setting", "value"), [("max_batch", 0), ("max_queue", 0), ("max_loaded", -1), ("threads", 0)]
)
def test_engine_refuses_settings_that_cannot_serve(setting: str, value: int) -> None:
    model = tiny_causal_lm("llama")
    with pytest.raises(InvalidValueError, match=setting):
        Engine(model, word_tokenizer(), AdapterPool(model), **{setting: value})


def test_multi_prompt_admission_is_all_or_nothing() -> None:
    model = tiny_causal_lm("llama")
    engine = Engine(model, word_tokenizer(), AdapterPool(model), max_queue=3)  # not started: nothing leaves
    engine.submit(_long(lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit_all([_long(lambda e: None) for _ in range(3)])
    assert engine.queue_length == 1  # none of the three was queued
    engine.submit_all([_long(lambda e: None) for _ in range(2)])
    assert engine.queue_length == 3


def test_cancelled_waiting_requests_leave_the_queue_and_gauges_return_to_zero() -> None:
    model = tiny_causal_lm("llama")
    metrics = _Recorder()
    engine = Engine(model, word_tokenizer(), AdapterPool(model), max_batch=1, metrics=metrics, threads=1)
    started = threading.Event()
    running = _long(lambda e: started.set(), n=250)
    waiting = [_long(lambda e: None, n=250) for _ in range(3)]
    engine.start()
    try:
        engine.submit(running)
        assert started.wait(30)
        engine.submit_all(waiting)
        for request in waiting:
            request.cancel()
        assert _until(lambda: engine.queue_length == 0)  # dropped while the only row still runs
        running.cancel()
        assert _until(lambda: metrics.last_state == (0, 0, 0))
    finally:
        engine.stop()
    assert sorted(metrics.reasons) == ["cancelled"] * 4
    assert all(not r.generated for r in waiting) and len(running.generated) < 250
    assert engine.threads_in_use == 1 and metrics.thread_count == 1


def test_shutdown_refuses_waiting_and_cancels_running_after_the_grace() -> None:
    model = tiny_causal_lm("llama")
    metrics = _Recorder()
    engine = Engine(model, word_tokenizer(), AdapterPool(model), max_batch=1, metrics=metrics).start()
    events: dict[str, list[Event]] = {"running": [], "waiting": []}
    running = _long(events["running"].append, n=250)
    waiting = _long(events["waiting"].append, n=250)
    engine.submit(running)
    assert _until(lambda: bool(events["running"]))
    engine.submit(waiting)
    engine.stop(timeout=30, grace=0.0)
    assert not engine.alive
    assert [(e.kind, e.status) for e in events["waiting"]] == [("error", 503)]
    assert (events["running"][-1].kind, events["running"][-1].status) == ("error", 503)
    assert len(running.generated) < 250 and not engine.rows and engine.queue_length == 0
    assert sorted(metrics.reasons) == ["shutdown", "shutdown"] and metrics.last_state == (0, 0, 0)
    with pytest.raises(RequestError) as info:
        engine.submit(_long(lambda e: None))
    assert info.value.status == 503


def test_shutdown_lets_running_rows_finish_within_the_grace() -> None:
    model = tiny_causal_lm("llama")
    engine = Engine(model, word_tokenizer(), AdapterPool(model), max_batch=1).start()
    events: list[Event] = []
    short = _long(events.append, n=5)
    engine.submit(short)
    assert _until(lambda: bool(events))
    engine.stop(timeout=30, grace=600.0)  # returns when the row is done, not after the grace
    assert not engine.alive
    assert events[-1].kind == "done" and len(short.generated) == 5
