"""Turn a request's ``model`` and ``compose`` fields into what each batch row uses.

- ``model="math"`` → the adapter (or compressed delta) ``math`` at weight 1;
- ``model=<base>`` with ``compose={"math": 0.7, "zh": 0.5}`` → both adapters, weighted
  (``Δ = 0.7 ΔW_math + 0.5 ΔW_zh``: the ``cat`` merge, computed per row without merging);
- ``model="flow"`` or ``compose="flow"`` → the saved fusion ``flow``: static weights, learned CAT
  weights per module, or LoRA-Flow gates per token and layer;
- ``model=<base>`` alone → the base model.

Errors are :class:`RequestError` (HTTP status, OpenAI error type, message). A served folder that
cannot be read (a corrupt adapter, fusion or delta) is a 400 naming it by its served name; no
message shows a path of the server's filesystem (:func:`public_text`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.adapters import LoRA, load_lora
from lorafuse.compress import load_compressed
from lorafuse.errors import LorafuseError
from lorafuse.fusion.artefact import Fusion, adapter_hashes, load_fusion
from lorafuse.serve.registry import Entry, Registry

log = logging.getLogger("lorafuse.serve")

# An absolute POSIX path: "/" not preceded by a word character, ".", ":" or "/" (so "4/8", "a/b"
# and URLs stay), then path characters.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()\[\]{}<>]*")
MAX_SHOWN = 120  # characters of a client-given name shown back in a message


def public_text(text: str, folders: Mapping[str | Path, str] | None = None) -> str:
    """``text`` without absolute paths of the server's filesystem: each of ``folders`` (a path →
    the name clients know it by) is replaced by its name, any other absolute path by its last
    component; lone surrogates become ``?`` so the text can always be sent as UTF-8 JSON."""
    for folder, name in sorted((folders or {}).items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(str(folder), name)

    def last(match: re.Match[str]) -> str:
        parts = [p for p in match.group(0).rstrip(".").split("/") if p]
        tail = match.group(0)[len(match.group(0).rstrip(".")) :]
        return (parts[-1] if parts else "/") + tail

    text = _ABSOLUTE_PATH.sub(last, text)
    return text.encode("utf-8", "replace").decode("utf-8")


def shown(name: object) -> str:
    """A client-given value for a message: at most ``MAX_SHOWN`` characters."""
    text = name if isinstance(name, str) else repr(name)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


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
        return self.fusion is not None and self.fusion.dynamic


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
        refused = self.registry.refusal(name) if entry is None else None
        if refused is not None:
            folder, reason = refused
            raise RequestError(
                404,
                f"The model `{name}` is not served: {self._public_text(reason, folder.path, name)} "
                "(GET /v1/models lists what is served)",
                param=param,
                code="model_not_servable",
            )
        if entry is None:
            raise RequestError(
                404,
                f"The model `{shown(name)}` does not exist: it is neither the base model nor a folder under "
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
            load = self._loader(
                "adapter", entry.name, entry.path, lambda: load_lora(entry.path, name=entry.name)
            )
            return Part(entry.key, load, weight)
        if entry.kind == "compressed":
            load = self._loader(
                "compressed delta",
                entry.name,
                entry.path,
                lambda: load_compressed(entry.path).to_lora(entry.name),
            )
            return Part(entry.key, load, weight)
        raise RequestError(
            400, f"`{entry.name}` is a fusion; name it alone in `model` or `compose`, not as a weight"
        )

    def _loader(self, what: str, name: str, folder: Path, load: Callable[[], LoRA]) -> Callable[[], LoRA]:
        """``load`` (run in the engine thread) with every failure a 400 naming ``what`` by its
        served ``name``, after checking again that no file of a served folder links outside the
        adapters folder."""

        def guarded() -> LoRA:
            try:
                if folder.is_relative_to(self.registry.root):
                    self.registry.check_contained(folder)
                return load()
            except RequestError:
                raise
            except Exception as exc:  # a corrupt folder must not answer 500 nor show paths
                if not isinstance(exc, (LorafuseError, OSError)):
                    log.warning("%s %s failed to load", what, name, exc_info=True)
                raise RequestError(
                    400, f"{what} `{name}` cannot be served: {self._public(exc, folder, name)}"
                ) from None

        return guarded

    def _public(self, exc: BaseException, folder: Path, name: str) -> str:
        return self._public_text(str(exc) or type(exc).__name__, folder, name)

    def _public_text(self, text: str, folder: Path, name: str) -> str:
        return public_text(text, {folder: name, self.registry.root: "<adapters>"})

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
                    400, f"weight of `{shown(name)}` must be a number, got {shown(weight)}", param="compose"
                )
            try:
                w = float(weight)
            except OverflowError:  # an integer too large for a float (10**400)
                w = math.inf
            if not math.isfinite(w):
                raise RequestError(
                    400,
                    f"weight of `{shown(name)}` is {shown(weight)}; weights must be finite",
                    param="compose",
                )
            if w < 0 and not self.limits.allow_negative:
                raise RequestError(
                    400,
                    f"weight of `{shown(name)}` is negative ({w}); start the server with "
                    "--allow-negative-weights to subtract adapters (task arithmetic)",
                    param="compose",
                )
            if abs(w) > self.limits.max_abs:
                raise RequestError(
                    400,
                    f"weight of `{shown(name)}` is {w}; |weight| must be ≤ {self.limits.max_abs}",
                    param="compose",
                )
            parts.append(self._part(self._entry(name, "compose"), w))
        label = "+".join(f"{n}*{float(w):g}" for n, w in compose.items())  # type: ignore[arg-type]
        return Composition(label=label, parts=tuple(p for p in parts if p.weight != 0.0))

    def _fusion(self, entry: Entry) -> Composition:
        """The fusion's composition (a corrupt fusion folder is a 400 naming the fusion)."""
        try:
            return self._fusion_composition(entry)
        except RequestError:
            raise
        except Exception as exc:  # a corrupt folder must not answer 500 nor show paths
            if not isinstance(exc, (LorafuseError, OSError)):
                log.warning("fusion %s failed to load", entry.name, exc_info=True)
            raise RequestError(
                400, f"fusion `{entry.name}` cannot be read: {self._public(exc, entry.path, entry.name)}"
            ) from None

    def _fusion_composition(self, entry: Entry) -> Composition:
        """The fusion's composition, cached by its key and the keys of the served adapters it was
        resolved against (hashing the LoRA files happens once, not per request)."""
        with self._lock:
            fusion = self._fusions.get(entry.key)
        if fusion is None:
            self.registry.check_contained(entry.path)
            fusion = load_fusion(entry.path)
            with self._lock:
                self._fusions[entry.key] = fusion
        served = tuple((e.key if (e := self.registry.get(n)) else "") for n in fusion.lora_names)
        with self._lock:
            cached = self._compositions.get((entry.key, served))
        if cached is not None:
            return cached
        static = not fusion.dynamic
        weights = fusion.tensors["weights"].tolist() if static else [1.0] * fusion.k
        parts = []
        for name, weight in zip(fusion.lora_names, weights, strict=True):
            folder = self._fusion_lora(entry.name, fusion, name)
            key = f"adapter:{folder}:" + ",".join(sorted(fusion.lora_hashes.get(name, {}).values()))
            load = self._loader(
                f"LoRA `{name}` of fusion", entry.name, folder, lambda f=folder, n=name: load_lora(f, name=n)
            )
            parts.append(Part(key, load, float(weight)))
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
