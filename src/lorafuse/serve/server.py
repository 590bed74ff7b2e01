"""Put the pieces together: model + pool + engine + registry → app; run it under uvicorn.

server = Server(model, tokenizer, "adapters/", ServeSettings(base_name="llama"))
server.run(host="127.0.0.1", port=8000)           # blocking, like `lorafuse serve`

with server.background(port=0) as url:            # tests and notebooks: a real server on
    openai.OpenAI(base_url=url + "/v1", ...)       # loopback in a thread, stopped on exit
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from torch import nn

from lorafuse.runtime.pool import AdapterPool
from lorafuse.serve.app import Limits, build_app
from lorafuse.serve.compose import Resolver, WeightLimits
from lorafuse.serve.engine import Engine
from lorafuse.serve.metrics import ServerMetrics
from lorafuse.serve.registry import Registry


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``lorafuse serve`` can set besides the model and the adapters folder."""

    base_name: str = "base"
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_loaded: int = 64
    limits: Limits = field(default_factory=Limits)
    weights: WeightLimits = field(default_factory=WeightLimits)
    lora_dtype: torch.dtype | None = None  # default: the base layers' dtype
    table_max_ranks: int = 64  # table kernel up to this many distinct ranks in a batch …
    table_ratio: float = 4.0  # … or this many times the widest row; else gather per row


class Server:
    """A model serving every adapter, fusion and compressed delta under ``adapters``."""

    def __init__(
        self, model: nn.Module, tokenizer, adapters: str | Path, settings: ServeSettings | None = None
    ):  # type: ignore[no-untyped-def]
        self.settings = settings or ServeSettings()
        s = self.settings
        self.registry = Registry(adapters)
        self.pool = AdapterPool(
            model, dtype=s.lora_dtype, table_max_ranks=s.table_max_ranks, table_ratio=s.table_ratio
        )
        self.metrics = ServerMetrics()
        self.engine = Engine(
            model,
            tokenizer,
            self.pool,
            max_batch=s.max_batch,
            max_queue=s.max_queue,
            max_loaded=s.max_loaded,
            metrics=self.metrics,
        )
        self.resolver = Resolver(self.registry, s.base_name, s.weights)
        self.app = build_app(
            self.engine, self.resolver, limits=s.limits, api_key=s.api_key, metrics=self.metrics
        )

    def run(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
        """Serve until interrupted (Ctrl-C)."""
        self.engine.start()
        try:
            uvicorn.run(self.app, host=host, port=port, log_level=log_level)
        finally:
            self.engine.stop()

    @contextlib.contextmanager
    def background(self, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
        """Run the server in a thread; yields its base URL (``http://127.0.0.1:PORT``)."""
        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.engine.start()
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="lorafuse-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        try:
            yield f"http://{host}:{port}"
        finally:
            server.should_exit = True
            thread.join(10)
            self.engine.stop()
