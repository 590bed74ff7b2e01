"""Serving many adapters, compositions, fusions and compressed deltas from one base model.

An OpenAI-compatible server (:class:`Server`, ``lorafuse serve``) over a continuous-batching
:class:`Engine` whose batch rows each use their own adapter or weighted combination through the
runtime's :class:`~lorafuse.runtime.pool.AdapterPool`.
"""

from lorafuse._extras import require

for _module in ("fastapi", "uvicorn", "prometheus_client"):
    require(_module, "serve", "lorafuse serve")

from lorafuse.serve.app import Limits, build_app
from lorafuse.serve.compose import Composition, RequestError, Resolver, WeightLimits
from lorafuse.serve.engine import Engine, Event, Request, SamplingParams
from lorafuse.serve.registry import Registry
from lorafuse.serve.server import Server, ServeSettings

__all__ = [
    "Composition",
    "Engine",
    "Event",
    "Limits",
    "Registry",
    "Request",
    "RequestError",
    "Resolver",
    "SamplingParams",
    "ServeSettings",
    "Server",
    "WeightLimits",
    "build_app",
]
