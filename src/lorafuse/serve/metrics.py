"""Prometheus metrics of the server (``GET /metrics``), one registry per app.

Gauges (running rows, distinct compositions, waiting requests) follow the engine after every
step and drop back to 0 when it goes idle.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorafuse.serve.engine import EngineMetrics, Request

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics(EngineMetrics):
    """Counters, gauges and histograms named ``lorafuse_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafuse_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.finished_requests = Counter(
            "lorafuse_requests_finished", "Generation requests by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("lorafuse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lorafuse_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram(
            "lorafuse_request_latency_seconds", "Queue + generation time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "lorafuse_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("lorafuse_running_rows", "Rows in the running batch", registry=r)
        self.distinct = Gauge(
            "lorafuse_batch_distinct_compositions", "Distinct compositions in the batch", registry=r
        )
        self.waiting = Gauge("lorafuse_waiting_requests", "Requests waiting for a batch slot", registry=r)
        self.loaded = Gauge("lorafuse_adapters_loaded", "Adapters in the pool", registry=r)
        self.loads = Gauge("lorafuse_adapter_loads", "Adapter loads since start", registry=r)
        self.evictions = Gauge("lorafuse_adapter_evictions", "Adapter evictions since start", registry=r)
        self.steps = Counter("lorafuse_decode_steps", "Batched decoding steps", registry=r)
        self.threads_gauge = Gauge("lorafuse_engine_threads", "Intra-op threads of the engine", registry=r)

    def batch(self, rows: int, distinct: int, queue: int) -> None:
        self.state(rows, distinct, queue)
        self.steps.inc()

    def state(self, rows: int, distinct: int, queue: int) -> None:
        self.running.set(rows)
        self.distinct.set(distinct)
        self.waiting.set(queue)

    def threads(self, count: int) -> None:
        self.threads_gauge.set(count)

    def finished(self, request: Request, reason: str) -> None:
        now = time.monotonic()
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.generation_tokens.inc(len(request.generated))
        self.latency.observe(now - request.arrived)
        if request.first_token is not None:
            self.first_token.observe(request.first_token - request.arrived)

    def adapters(self, loaded: int, loads: int, evictions: int) -> None:
        self.loaded.set(loaded)
        self.loads.set(loads)
        self.evictions.set(evictions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
