"""The adapters ``lorafuse serve --engine vllm`` writes for vLLM: an LRU of PEFT folders on disk.

Each composition is written once as a PEFT folder named ``lf-`` + the SHA-256 of its files, kept
under one cache folder capped in bytes; the backend unloads an adapter from vLLM before
:meth:`AdapterCache.remove` deletes its folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

PREFIX = "lf-"  # the names lorafuse gives the adapters it loads into vLLM


@dataclass
class Cached:
    """One adapter folder of the cache; ``refs`` counts the requests using it now."""

    name: str
    path: Path
    size: int
    rank: int
    refs: int = 0
    loaded: bool = False


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def content_name(folder: Path) -> str:
    """``lf-`` + the first 24 hex digits of the SHA-256 of the folder's files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return PREFIX + digest.hexdigest()[:24]


def adapter_rank(folder: Path) -> int:
    """The largest rank of a PEFT folder's config (``r`` and ``rank_pattern``); 0 if unreadable."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
        return max(ranks)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class AdapterCache:
    """Adapter folders under ``root`` by name, least recently used first, at most ``max_bytes``
    in all (the newest entry always stays, however large). Folders found at start are kept, in
    the order of their times."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[str, Cached] = OrderedDict()
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
        for path in sorted(found, key=lambda p: p.stat().st_mtime):
            if (path / "adapter_config.json").is_file():
                self.entries[path.name] = Cached(path.name, path, folder_size(path), adapter_rank(path))
        for stale in self.root.glob(".work-*"):  # a materialisation that never finished
            shutil.rmtree(stale, ignore_errors=True)

    @property
    def size(self) -> int:
        return sum(c.size for c in self.entries.values())

    def get(self, name: str) -> Cached | None:
        cached = self.entries.get(name)
        if cached is not None and not cached.path.is_dir():  # removed behind our back
            del self.entries[name]
            return None
        return cached

    def touch(self, name: str) -> None:
        self.entries.move_to_end(name)

    def work_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".work-", dir=self.root))

    def add(self, folder: Path, rank: int) -> Cached:
        """Move the written ``folder`` into the cache under its content name (when that name is
        cached already, ``folder`` is dropped and the cached one returned)."""
        name = content_name(folder)
        cached = self.get(name)
        if cached is None:
            target = self.root / name
            if target.exists():  # a folder of that name the cache did not know (a past run)
                shutil.rmtree(target)
            folder.rename(target)
            cached = Cached(name, target, folder_size(target), rank)
            self.entries[name] = cached
        self.touch(name)
        return cached

    def over(self, keep: Cached) -> list[Cached]:
        """Idle entries to evict, oldest first, for the cache to fit ``max_bytes``."""
        excess = self.size - self.max_bytes
        victims = []
        for cached in self.entries.values():
            if excess <= 0:
                break
            if cached is not keep and cached.refs == 0:
                victims.append(cached)
                excess -= cached.size
        return victims

    def remove(self, cached: Cached) -> None:
        self.entries.pop(cached.name, None)
        shutil.rmtree(cached.path, ignore_errors=True)
