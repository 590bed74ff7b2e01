"""Turn a request's ``model`` and ``compose`` fields into what each batch row uses.

- ``model="math"`` → the adapter (or compressed delta) ``math`` at weight 1;
- ``model=<base>`` with ``compose={"math": 0.7, "zh": 0.5}`` → both adapters, weighted
  (``Δ = 0.7 ΔW_math + 0.5 ΔW_zh``: the ``cat`` merge, computed per row without merging);
- ``model="flow"`` or ``compose="flow"`` → the saved fusion ``flow``: static weights, learned CAT
  weights per module, or LoRA-Flow gates per token and layer;
- ``model=<base>`` alone → the base model.

Errors are :class:`RequestError` (HTTP status, OpenAI error type, message).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.adapters import LoRA, load_lora
from lorafuse.compress import load_compressed
from lorafuse.errors import LorafuseError
from lorafuse.fuse.fusion import Fusion, adapter_hashes, load_fusion
from lorafuse.serve.registry import Entry, Registry


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of an HTTP status."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


@dataclass(frozen=True)
class Part:
    """One LoRA a row uses: pool key, how to load it, weight."""

    key: str
    load: Callable[[], LoRA] = field(compare=False, hash=False)
    weight: float = 1.0


@dataclass(frozen=True)
class Composition:
    """What one request's rows use. ``fusion`` is set for ``lora-flow`` and ``cat-weights``."""

    label: str
    parts: tuple[Part, ...] = ()
    fusion: Fusion | None = field(default=None, compare=False, hash=False)
    fusion_key: str | None = None

    @property
    def dynamic(self) -> bool:
        return self.fusion is not None and self.fusion.method in ("lora-flow", "cat-weights")


@dataclass(frozen=True)
class WeightLimits:
    """Weights allowed in ``compose``: finite, ``|w| ≤ max_abs``, negative only if allowed."""

    max_abs: float = 10.0
    allow_negative: bool = False
    max_parts: int = 16


class Resolver:
    """Resolve request fields against a :class:`Registry`; caches loaded fusions by key."""

    def __init__(self, registry: Registry, base_name: str, limits: WeightLimits | None = None) -> None:
        self.registry = registry
        self.base_name = base_name
        self.limits = limits or WeightLimits()
        self._fusions: dict[str, Fusion] = {}
        self._compositions: dict[tuple[str, tuple[str, ...]], Composition] = {}
        self._lock = threading.Lock()

    def resolve(self, model: object, compose: object = None) -> Composition:
        if not isinstance(model, str) or not model:
            raise RequestError(400, "`model` must be a non-empty string", param="model")
        if compose is not None:
            if model != self.base_name:
                raise RequestError(
                    400,
                    f"with `compose`, set `model` to the base model {self.base_name!r} (got {model!r}); "
                    "`compose` then says which adapters to use",
                    param="model",
                )
            if isinstance(compose, str):
                return self._named(compose, param="compose")
            if isinstance(compose, Mapping):
                return self._weighted(compose)
            raise RequestError(
                400, "`compose` must be an object {adapter: weight} or the name of a fusion", param="compose"
            )
        if model == self.base_name:
            return Composition(label=self.base_name)
        return self._named(model, param="model")

    # -- pieces ---------------------------------------------------------------------------------
    def _entry(self, name: str, param: str) -> Entry:
        entry = self.registry.get(name)
        if entry is None:
            raise RequestError(
                404,
                f"The model `{name}` does not exist: it is neither the base model nor a folder under "
                "the adapters folder (GET /v1/models lists what is served)",
                param=param,
                code="model_not_found",
            )
        return entry

    def _named(self, name: str, param: str) -> Composition:
        entry = self._entry(name, param)
        if entry.kind == "fusion":
            return self._fusion(entry)
        return Composition(label=name, parts=(self._part(entry, 1.0),))

    def _part(self, entry: Entry, weight: float) -> Part:
        if entry.kind == "adapter":
            path = entry.path
            return Part(entry.key, lambda: load_lora(path, name=entry.name), weight)
        if entry.kind == "compressed":

            def load() -> LoRA:
                try:
                    return load_compressed(entry.path).to_lora(entry.name)
                except LorafuseError as exc:
                    raise RequestError(
                        400, f"compressed delta `{entry.name}` cannot be served: {exc}"
                    ) from None

            return Part(entry.key, load, weight)
        raise RequestError(
            400, f"`{entry.name}` is a fusion; name it alone in `model` or `compose`, not as a weight"
        )

    def _weighted(self, compose: Mapping[object, object]) -> Composition:
        if not compose:
            raise RequestError(
                400, "`compose` is empty; give at least one {adapter: weight}", param="compose"
            )
        if len(compose) > self.limits.max_parts:
            raise RequestError(
                400,
                f"`compose` has {len(compose)} adapters; at most {self.limits.max_parts}",
                param="compose",
            )
        parts = []
        for name, weight in compose.items():
            if not isinstance(name, str):
                raise RequestError(400, "`compose` keys must be adapter names", param="compose")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise RequestError(
                    400, f"weight of `{name}` must be a number, got {weight!r}", param="compose"
                )
            w = float(weight)
            if not math.isfinite(w):
                raise RequestError(
                    400, f"weight of `{name}` is {weight}; weights must be finite", param="compose"
                )
            if w < 0 and not self.limits.allow_negative:
                raise RequestError(
                    400,
                    f"weight of `{name}` is negative ({w}); start the server with --allow-negative-weights "
                    "to subtract adapters (task arithmetic)",
                    param="compose",
                )
            if abs(w) > self.limits.max_abs:
                raise RequestError(
                    400,
                    f"weight of `{name}` is {w}; |weight| must be ≤ {self.limits.max_abs}",
                    param="compose",
                )
            parts.append(self._part(self._entry(name, "compose"), w))
        label = "+".join(f"{n}*{float(w):g}" for n, w in compose.items())  # type: ignore[arg-type]
        return Composition(label=label, parts=tuple(p for p in parts if p.weight != 0.0))

    def _fusion(self, entry: Entry) -> Composition:
        """The fusion's composition, cached by its key and the keys of the served adapters it was
        resolved against (hashing the LoRA files happens once, not per request)."""
        with self._lock:
            fusion = self._fusions.get(entry.key)
        if fusion is None:
            try:
                fusion = load_fusion(entry.path)
            except (LorafuseError, OSError, ValueError) as exc:
                raise RequestError(400, f"fusion `{entry.name}` cannot be read: {exc}") from None
            with self._lock:
                self._fusions[entry.key] = fusion
        served = tuple((e.key if (e := self.registry.get(n)) else "") for n in fusion.lora_names)
        with self._lock:
            cached = self._compositions.get((entry.key, served))
        if cached is not None:
            return cached
        static = fusion.method == "static"
        weights = fusion.tensors["weights"].tolist() if static else [1.0] * fusion.k
        parts = []
        for name, weight in zip(fusion.lora_names, weights, strict=True):
            folder = self._fusion_lora(entry.name, fusion, name)
            key = f"adapter:{folder}:" + ",".join(sorted(fusion.lora_hashes.get(name, {}).values()))
            parts.append(
                Part(key, lambda folder=folder, name=name: load_lora(folder, name=name), float(weight))
            )
        composition = Composition(
            label=entry.name,
            parts=tuple(parts),
            fusion=None if static else fusion,
            fusion_key=None if static else entry.key,
        )
        with self._lock:
            self._compositions[(entry.key, served)] = composition
        return composition

    def _fusion_lora(self, fusion_name: str, fusion: Fusion, name: str) -> Path:
        """The folder of a fusion's LoRA: the served adapter of that name or the recorded path,
        whichever has the recorded hashes."""
        wanted = fusion.lora_hashes.get(name)
        candidates = []
        served = self.registry.get(name)
        if served is not None and served.kind == "adapter":
            candidates.append(served.path)
        if fusion.lora_paths.get(name):
            candidates.append(Path(fusion.lora_paths[name]))
        for folder in candidates:
            if folder.is_dir() and (not wanted or adapter_hashes(folder) == wanted):
                return folder
        raise RequestError(
            400,
            f"fusion `{fusion_name}` needs LoRA `{name}` as it was trained (SHA-256 recorded in its "
            "fusion.json); neither a served adapter of that name nor the recorded path has it",
        )
