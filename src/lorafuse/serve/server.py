"""Put the pieces together: model + pool + engine + registry → app; run it under uvicorn.

server = Server(model, tokenizer, "adapters/", ServeSettings(base_name="llama"))
server.run(host="127.0.0.1", port=8000)           # blocking, like `lorafuse serve`

with server.background(port=0) as url:            # tests and notebooks: a real server on
    openai.OpenAI(base_url=url + "/v1", ...)       # loopback in a thread, stopped on exit

Settings are checked when :class:`ServeSettings` is made (``max_batch ≥ 1``, a non-empty API key
when one is given, ...), so a server that cannot work never starts. On SIGTERM or SIGINT the
server stops admitting (503), refuses waiting requests, gives running rows ``shutdown_grace``
seconds to finish, cancels the rest and exits (status 0); a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
import uvicorn
from torch import nn

from lorafuse._checks import InvalidValueError, check_number
from lorafuse.runtime.pool import AdapterPool
from lorafuse.serve.app import Limits, build_app
from lorafuse.serve.backend import Backend
from lorafuse.serve.compose import Resolver, WeightLimits
from lorafuse.serve.engine import Engine, default_threads
from lorafuse.serve.metrics import ServerMetrics
from lorafuse.serve.registry import Registry
from lorafuse.serve.servable import ServableCheck


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
    threads: int | None = None  # torch intra-op threads of the engine; None: default_threads()
    shutdown_grace: float = 5.0  # seconds running rows may take to finish on SIGTERM

    def __post_init__(self) -> None:
        """Refuse settings that would serve badly or not at all (one line naming the field)."""
        for name in ("max_batch", "max_queue", "max_loaded"):
            check_number(getattr(self, name), name, integer=True, low=1)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise InvalidValueError(
                "api_key is empty: the server would run without authentication; give a key or none"
            )
        if self.threads is not None:
            check_number(self.threads, "threads", integer=True, low=1, high=4096)
        check_number(self.shutdown_grace, "shutdown_grace", low=0, high=3600)
        check_number(self.table_max_ranks, "table_max_ranks", integer=True, low=0)
        check_number(self.table_ratio, "table_ratio", low=0, high=1e6)
        check_number(self.weights.max_abs, "weights.max_abs", low=0, low_open=True, high=1e6)
        check_number(self.weights.max_parts, "weights.max_parts", integer=True, low=1)

    @property
    def engine_threads(self) -> int:
        """The engine's intra-op threads: ``threads`` or :func:`default_threads`."""
        return self.threads if self.threads is not None else default_threads()


class _Uvicorn(uvicorn.Server):
    """uvicorn that drains the engine on shutdown and exits normally after a signal.

    The first SIGTERM / SIGINT starts the graceful shutdown (the engine refuses new and waiting
    requests at once, running rows get ``grace`` seconds); a second one forces the exit.
    Connections still open ``grace + 5`` s later (slow readers) are cancelled.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain = drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._drain()
        await super().shutdown(sockets)


class Server:
    """A model serving every adapter, fusion and compressed delta under ``adapters``.

    ``backend``: what generates; by default lorafuse's :class:`Engine` on ``model``. With a
    :class:`~lorafuse.serve.vllm.VllmBackend`, requests are forwarded to vLLM and ``model`` is
    only read for its layers' names and shapes (a model on the ``meta`` device will do).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,  # type: ignore[no-untyped-def]
        adapters: str | Path,
        settings: ServeSettings | None = None,
        *,
        backend: Backend | None = None,
    ):
        self.settings = settings or ServeSettings()
        s = self.settings
        self.threads = s.engine_threads
        self.registry = Registry(adapters, check=ServableCheck(model))
        own = getattr(backend, "metrics", None)
        self.metrics = own if isinstance(own, ServerMetrics) else ServerMetrics()
        if backend is None:
            self.pool = AdapterPool(
                model, dtype=s.lora_dtype, table_max_ranks=s.table_max_ranks, table_ratio=s.table_ratio
            )
            backend = Engine(
                model,
                tokenizer,
                self.pool,
                max_batch=s.max_batch,
                max_queue=s.max_queue,
                max_loaded=s.max_loaded,
                metrics=self.metrics,
                threads=self.threads,
            )
        self.engine: Backend = backend
        self.resolver = Resolver(self.registry, s.base_name, s.weights)
        self.app = build_app(
            self.engine, self.resolver, limits=s.limits, api_key=s.api_key, metrics=self.metrics
        )

    @property
    def startup_line(self) -> str:
        """What the engine runs with, for the server's first lines."""
        return self.engine.describe()

    def _uvicorn(self, host: str, port: int, log_level: str) -> _Uvicorn:
        grace = self.settings.shutdown_grace
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=max(1, round(grace + 5)),
        )
        return _Uvicorn(config, lambda: self.engine.shutdown(grace))

    def run(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
        """Serve until SIGTERM or SIGINT (Ctrl-C), then shut down gracefully."""
        self.engine.start()
        try:
            self._uvicorn(host, port, log_level).run()
        finally:
            self.engine.stop(timeout=5)

    @contextlib.contextmanager
    def background(self, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
        """Run the server in a thread; yields its base URL (``http://127.0.0.1:PORT``)."""
        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.engine.start()
        server = self._uvicorn(host, port, log_level)
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
            thread.join(self.settings.shutdown_grace + 10)
            self.engine.stop(timeout=5)
