"""The continuous-batching engine on Llama, Qwen2, Mistral and GPT-2: rows join and leave a running
batch (KV caches of different lengths merged), and every answer equals batch-1 generation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from lorafuse import attach, detach, load_lora
from lorafuse.runtime.pool import AdapterPool
from lorafuse.serve.compose import Composition, Part
from lorafuse.serve.engine import Engine, Event, Request, SamplingParams
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
