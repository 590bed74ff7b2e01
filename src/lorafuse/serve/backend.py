"""What the HTTP app needs from whatever generates: the seam between the API and an engine.

Two backends implement :class:`Backend`:

- :class:`~lorafuse.serve.engine.Engine`, lorafuse's own continuous-batching engine (every
  adapter, composition, fusion, router and compressed delta, on the base model in this process);
- :class:`~lorafuse.serve.vllm.VllmBackend`, a forwarder to a running vLLM OpenAI server: each
  request's composition is materialised once as one PEFT adapter, loaded into vLLM at run time,
  and the request's token ids are sent to vLLM's ``/v1/completions``.

The app validates every request the same way whichever backend serves it (limits, weights,
prompts, API key) and builds every response itself from the backend's :class:`Event` stream, so
responses have the same shape and the ``model`` the client asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from lorafuse.serve.engine import Request


@runtime_checkable
class Backend(Protocol):
    """Generates for the app. ``enqueue`` starts all of a request's rows or none."""

    tokenizer: Any
    max_length: int  # the model's context (prompt + generated tokens)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold (``0 … vocab_size - 1``)."""
        ...

    @property
    def draining(self) -> bool:
        """Whether shutting down (every route but ``/metrics`` answers 503)."""
        ...

    def start(self) -> Any: ...

    def describe(self) -> str:
        """One line saying what generates and with what settings (printed at start)."""
        ...

    def shutdown(self, grace: float = 0.0) -> None: ...

    def stop(self, timeout: float = 10.0, grace: float = 0.0) -> None: ...

    async def enqueue(self, requests: Sequence[Request]) -> None:
        """Start generating every one of ``requests`` (one composition), or raise a
        :class:`~lorafuse.serve.compose.RequestError` with nothing started: 429 when full, 400
        for what this backend cannot serve, 502/503 when what it forwards to fails. Progress
        then arrives through each request's ``emit``."""
        ...

    async def health(self) -> dict[str, object]:
        """``{"status": "ok", ...}``, or a 503 :class:`~lorafuse.serve.compose.RequestError`."""
        ...
