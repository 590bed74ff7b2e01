"""What a server can serve: the adapters, fusions and compressed deltas found under one folder.

Each direct sub-folder of the adapters folder whose name is a valid model name is one entry:

- ``adapter_config.json`` → a PEFT LoRA adapter (``kind="adapter"``);
- ``fusion.json`` → a saved fusion (``kind="fusion"``, see :mod:`lorafuse.fusion.artefact`);
- ``compressed.json`` → a compressed fine-tuning delta (``kind="compressed"``, low-rank kinds
  only are servable: Delta-CoMe and SVD truncation; BitDelta/RTN deltas are dense).

Names from requests are only ever looked up in this registry, never joined into paths, so no
request can reach a file outside the folder. Sub-folders that are links resolving outside the
folder are skipped, and so are sub-folders holding a linked file (or folder) that resolves
outside the adapters folder; loading checks this again (:meth:`Registry.check_contained`).
The folder is scanned again when a name is not found, so adding a folder makes it servable
without a restart; a changed adapter (new file time or size) gets a new key
and is loaded again (noticed within ``rescan_interval`` seconds).

A ``check`` (the server's :class:`~lorafuse.serve.servable.ServableCheck`) decides at scan time
whether an entry can be served at all on the model (a PEFT adapter with ``target_parameters``, a
MoE checkpoint's compressed delta cannot): a refused entry is not listed, its reason is logged
once per version of its files and kept for :meth:`Registry.refusal`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorafuse._artefact import ArtefactError, find_format
from lorafuse.adapters.peft_format import LORA_FORMAT
from lorafuse.compress.format import COMPRESSED_FORMAT
from lorafuse.errors import LorafuseError
from lorafuse.fusion.artefact import FUSION_FORMAT

log = logging.getLogger("lorafuse.serve")

Kind = Literal["adapter", "fusion", "compressed"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: The artefact formats served (by :func:`lorafuse._artefact.find_format`) and their kind here;
#: a folder of another format (a mixture, an encoder) is not an entry.
KINDS: dict[str, Kind] = {
    LORA_FORMAT.kind: "adapter",
    FUSION_FORMAT.kind: "fusion",
    COMPRESSED_FORMAT.kind: "compressed",
}
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "fusion.json",
    "weights.safetensors",
    "compressed.json",
    "delta.safetensors",
)


@dataclass(frozen=True)
class Entry:
    """One servable folder. ``key`` changes whenever its files change (size or time)."""

    name: str
    kind: Kind
    path: Path  # resolved, inside the registry's root
    key: str
    created: int  # seconds since the epoch (folder time), for /v1/models


def fingerprint(folder: Path) -> str:
    parts = []
    for name in WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            st = f.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class OutsideLinkError(LorafuseError, PermissionError):
    """A served folder holds a link that resolves outside the adapters folder."""


def outside_link(folder: Path, root: Path) -> str | None:
    """The first link under ``folder`` (walked without following links) that resolves outside
    ``root``, as a path relative to ``folder``; ``None`` when there is none."""
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            children = list(os.scandir(current))
        except OSError:
            continue
        for child in children:
            path = Path(child.path)
            if child.is_symlink():
                try:
                    target = path.resolve(strict=False)
                except (OSError, RuntimeError):  # a loop of links
                    return str(path.relative_to(folder))
                if not target.is_relative_to(root):
                    return str(path.relative_to(folder))
            elif child.is_dir(follow_symlinks=False):
                pending.append(path)
    return None


class Registry:
    """Adapters, fusions and compressed deltas under ``root``, by name."""

    def __init__(
        self,
        root: str | Path,
        *,
        rescan_interval: float = 1.0,
        check: Callable[[Entry], str | None] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapters folder {root} does not exist")
        self.rescan_interval = rescan_interval
        self.check = check
        self._entries: dict[str, Entry] = {}
        self._not_servable: dict[str, tuple[Entry, str]] = {}  # name → (entry, reason)
        self._verdicts: dict[str, str | None] = {}  # entry key → reason (None: servable)
        self._lock = threading.Lock()
        self._scanned = 0.0
        self._refused: set[str] = set()  # folders skipped for links out (warned once)
        self.scan()

    def scan(self) -> dict[str, Entry]:
        """Read the folder again; returns the entries by name."""
        found: dict[str, Entry] = {}
        not_servable: dict[str, tuple[Entry, str]] = {}
        for folder in sorted(self.root.iterdir()):
            if not NAME_RE.match(folder.name) or not folder.is_dir():
                continue
            resolved = folder.resolve()
            if not resolved.is_relative_to(self.root):
                continue  # a link out of the adapters folder
            link = outside_link(resolved, self.root)
            if link is not None:
                if folder.name not in self._refused:
                    log.warning("not serving %s: %s links outside the adapters folder", folder.name, link)
                self._refused.add(folder.name)
                continue
            try:
                fmt = find_format(resolved)
            except ArtefactError as exc:
                if folder.name not in self._refused:
                    log.warning("not serving %s: %s", folder.name, exc)
                self._refused.add(folder.name)
                continue
            kind = KINDS.get(fmt.kind) if fmt is not None else None
            if kind is None:
                continue
            key = f"{kind}:{resolved}:{fingerprint(resolved)}"
            created = int(resolved.stat().st_mtime)
            entry = Entry(folder.name, kind, resolved, key, created)
            reason = self._verdict(entry)
            if reason is None:
                found[folder.name] = entry
            else:
                not_servable[folder.name] = (entry, reason)
        with self._lock:
            self._entries = found
            self._not_servable = not_servable
            self._scanned = time.monotonic()
        return found

    def _verdict(self, entry: Entry) -> str | None:
        """``check(entry)``, once per version of the entry's files (a refusal is logged then)."""
        if self.check is None:
            return None
        with self._lock:
            if entry.key in self._verdicts:
                return self._verdicts[entry.key]
        reason = self.check(entry)
        if reason is not None:
            log.warning("not serving %s: %s", entry.name, reason)
        with self._lock:
            self._verdicts[entry.key] = reason
        return reason

    def refusal(self, name: str) -> tuple[Entry, str] | None:
        """The entry called ``name`` and why it is not served, when the last scan refused it."""
        with self._lock:
            return self._not_servable.get(name)

    def not_servable(self) -> dict[str, str]:
        """``{name: reason}`` of the folders the last scan refused (not listed, not served)."""
        with self._lock:
            return {name: reason for name, (_, reason) in self._not_servable.items()}

    def check_contained(self, folder: Path) -> None:
        """Raise :class:`OutsideLinkError` when a file under ``folder`` links outside the adapters
        folder (checked again right before loading: files may change after a scan)."""
        link = outside_link(folder, self.root)
        if link is not None:
            raise OutsideLinkError(f"{link} is a link that points outside the adapters folder")

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, name: str) -> Entry | None:
        """The entry called ``name``, or ``None``. An unknown name rescans the folder (a listing
        and a few ``stat`` calls); known names are checked for changed files every
        ``rescan_interval`` seconds."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            return None
        with self._lock:
            stale = time.monotonic() - self._scanned >= self.rescan_interval
            entries = self._entries
        if stale or name not in entries:
            entries = self.scan()
        return entries.get(name)
