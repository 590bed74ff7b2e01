"""The adapter catalogue: an embedded SQLite index of folders of LoRA adapters.

``index(db, roots)`` walks folders recursively and records every adapter it finds:

- a **PEFT** folder (``adapter_config.json``): loaded and validated with
  :func:`lorafuse.adapters.load_lora` (the same checks and messages as every other verb), then
  summarised per module: rank, alpha, scale, shapes, ``‖ΔW‖_F`` and the top right singular vector
  of ``ΔW`` (:mod:`lorafuse.library.summary`), stored as float16;
- a **fusion** folder (``fusion.json``, format ``lorafuse-fusion``): its method, base model and
  the LoRAs it weights (names, paths, SHA-256 of their files), read from the JSON only;
- a **compressed delta** (``compressed.json``, format ``lorafuse-compressed-delta``): its method,
  budget, sizes, base and per-module shapes from the JSON; a delta of low-rank kinds (``low-rank``,
  Delta-CoMe) is also loaded as the LoRA it serves as (``A = V̂ᵀ``, ``B = Û diag(S)``, scale 1),
  checked against the base and summarised like a PEFT adapter (norms, directions); a dense one
  (BitDelta, RTN) has no factors to summarise without forming ``ΔW`` and keeps the JSON's columns.

An adapter that cannot be used is kept with ``status = 'broken'``, a ``problem`` class
(``format``: missing, truncated or unreadable files, bad JSON, non-finite weights;
``unsupported``: DoRA, other PEFT types, ``modules_to_save``...; ``incompatible``: does not fit
the base model given to ``index``; ``error``: anything else) and the validation message.

Indexing is incremental and resumable: each adapter's files are recorded with their size,
``mtime_ns`` and SHA-256; an adapter whose files all keep their size and ``mtime_ns`` is not read
again; a changed one is re-hashed and re-indexed; folders gone from the scanned roots are dropped.
Each adapter is written in its own transaction, so an interrupted run leaves a consistent
catalogue and the next run continues where it stopped. Adapters are streamed one at a time
(load, summarise, drop), so memory stays bounded by the largest adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lorafuse._artefact import ArtefactError, Format, find_format
from lorafuse._io import lorafuse_home, read_json_file, read_safetensors_header
from lorafuse._layers import layer_index
from lorafuse.adapters import load_lora
from lorafuse.adapters.lora import LoRA, module_kind
from lorafuse.adapters.peft_format import LORA_FORMAT
from lorafuse.adapters.validate import check_compatible
from lorafuse.compress.format import COMPRESSED_FORMAT, load_compressed
from lorafuse.compress.types import KINDS
from lorafuse.errors import (
    AdapterFormatError,
    CompatibilityError,
    LorafuseError,
    UnsupportedAdapterError,
)
from lorafuse.fusion.artefact import FUSION_FORMAT
from lorafuse.library.summary import direction_bytes, summarize_many

SCHEMA_VERSION = 1
DB_NAME = "library.sqlite"
#: The artefact format of each kind catalogued (told apart by :func:`lorafuse._artefact.find_format`),
#: and the files whose content makes the adapter.
FORMATS: dict[str, Format] = {"peft": LORA_FORMAT, "fusion": FUSION_FORMAT, "compressed": COMPRESSED_FORMAT}
KIND_OF = {fmt.kind: kind for kind, fmt in FORMATS.items()}
CHECKED_KINDS = ("peft", "compressed")  # kinds checked against the base model given to index
KIND_FILES = {
    "peft": ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"),
    "fusion": ("fusion.json", "weights.safetensors"),
    "compressed": ("compressed.json", "delta.safetensors", "other.safetensors"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,              -- peft | fusion | compressed
    status TEXT NOT NULL,            -- ok | broken
    problem TEXT,                    -- format | unsupported | incompatible | error (broken only)
    reason TEXT,                     -- the validation message (broken only)
    sha256 TEXT NOT NULL,            -- SHA-256 over the files' names and SHA-256s
    bytes INTEGER NOT NULL,
    base_model TEXT,
    peft_type TEXT,
    method TEXT,                     -- fusion / compressed method
    ranks TEXT,                      -- JSON list of distinct ranks
    alphas TEXT,                     -- JSON list of distinct alphas
    targets TEXT,                    -- JSON list of module kinds
    min_rank INTEGER,
    max_rank INTEGER,
    num_modules INTEGER,
    num_params INTEGER,
    dtype TEXT,
    total_norm REAL,                 -- sqrt(Σ_modules ‖ΔW‖²_F)
    norms TEXT,                      -- JSON {kind: {modules, mean, max, total}}
    info TEXT,                       -- JSON: a fusion's LoRAs, a compressed delta's budget, ...
    checked_base TEXT,               -- fingerprint of the base's layer shapes it was checked against
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (adapter_id, name)
);
CREATE TABLE IF NOT EXISTS modules (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    layer INTEGER,                   -- the decoder layer index in the path, if any
    rank INTEGER,
    alpha REAL,
    scale REAL,
    in_features INTEGER NOT NULL,
    out_features INTEGER NOT NULL,
    norm REAL,                       -- ‖s · B A‖_F
    sigma1 REAL,                     -- top singular value of s · B A
    direction BLOB,                  -- float16 top right singular vector (in_features,)
    PRIMARY KEY (adapter_id, path)
);
CREATE INDEX IF NOT EXISTS modules_kind ON modules(kind, adapter_id);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
"""

_JSON_COLUMNS = ("ranks", "alphas", "targets", "norms", "info")


class LibraryError(LorafuseError, ValueError):
    """A catalogue that cannot be opened or used (not a SQLite file, another schema, no such adapter)."""


def default_db() -> Path:
    """``$LORAFUSE_HOME/library.sqlite``."""
    return lorafuse_home() / DB_NAME


# -- the database --------------------------------------------------------------------------------
def connect(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> sqlite3.Connection:
    """Open (or create) the catalogue at ``path`` and check its schema version.

    Raises :class:`LibraryError` for a file that is not a SQLite database, a catalogue written by
    another schema version, or (``create=False``) a catalogue that does not exist.
    """
    db = Path(path) if path is not None else default_db()
    if db.is_dir():
        raise LibraryError(f"{db}: is a folder; --db takes the catalogue's file name (library.sqlite)")
    if not db.exists():
        if not create:
            raise LibraryError(f"{db}: no catalogue here; build one with `lorafuse library index DIR`")
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(str(db), isolation_level=None)  # explicit transactions only
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        version = _schema_version(con)
        if version is None:
            with _transaction(con):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?), ('created', ?)",
                    (str(SCHEMA_VERSION), str(time.time())),
                )
        elif version != SCHEMA_VERSION:
            con.close()
            raise LibraryError(
                f"{db}: catalogue schema version {version}, this lorafuse reads version "
                f"{SCHEMA_VERSION}; index into a new --db file"
            )
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.DatabaseError as exc:
        raise LibraryError(f"{db}: not a lorafuse catalogue ({exc}); give another --db file") from None
    return con


def _schema_version(con: sqlite3.Connection) -> int | None:
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise sqlite3.DatabaseError("a SQLite database without lorafuse's meta table")
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("no schema_version in its meta table")
    return int(row[0])


class _transaction:
    """``with _transaction(con):`` BEGIN … COMMIT, ROLLBACK on any exception (interrupts included)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.con.execute("ROLLBACK" if exc_type is not None else "COMMIT")


# -- finding adapters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    """An adapter folder found under a scanned root."""

    kind: str
    path: Path  # resolved
    name: str  # path relative to the root (the root's own name if the root is the adapter)
    stats: dict[str, tuple[int, int]]  # file name → (size, mtime_ns)


def _file_stats(folder: Path, kind: str) -> dict[str, tuple[int, int]]:
    stats = {}
    for name in KIND_FILES[kind]:
        try:
            st = (folder / name).stat()
        except OSError:
            continue
        stats[name] = (st.st_size, st.st_mtime_ns)
    return stats


def discover(roots: Sequence[Path]) -> Iterator[Found]:
    """Every adapter folder under ``roots`` (recursively, in sorted order, hidden folders skipped).

    A folder that :func:`~lorafuse._artefact.find_format` finds to be a PEFT adapter
    (``adapter_config.json``), a fusion (``fusion.json``) or a compressed delta
    (``compressed.json``) is one adapter; its sub-folders are not searched.
    """
    for root in roots:
        root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            try:
                fmt = find_format(folder, set(filenames))
            except ArtefactError:  # several headers: catalogued as the first of ours it holds
                fmt = next((f for f in (FUSION_FORMAT, COMPRESSED_FORMAT) if f.header in filenames), None)
            kind = KIND_OF.get(fmt.kind) if fmt is not None else None
            if kind is not None:
                dirnames[:] = []
                relative = folder.relative_to(root).as_posix()
                name = root.name if relative == "." else relative
                yield Found(kind, folder, name, _file_stats(folder, kind))
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- summarising one adapter ---------------------------------------------------------------------
@dataclass
class Record:
    """What the catalogue stores for one adapter (``modules`` rows hold the directions)."""

    kind: str
    status: str = "ok"
    problem: str | None = None
    reason: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    modules: list[tuple[Any, ...]] = field(default_factory=list)
    files: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name → size, mtime, sha


def _problem(exc: BaseException) -> str:
    if isinstance(exc, UnsupportedAdapterError):
        return "unsupported"
    if isinstance(exc, CompatibilityError):
        return "incompatible"
    if isinstance(exc, ArtefactError):  # an adapter's or a compressed delta's files
        return "format"
    return "error"


def _distinct(values: Iterable[float]) -> list[float]:
    return sorted({float(f"{v:.6g}") for v in values})


def summarize_lora(lora: LoRA) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """The catalogue columns and module rows of a loaded LoRA (norms and directions factored)."""
    rows: list[tuple[Any, ...]] = []
    norms: dict[str, list[float]] = {}
    summaries = summarize_many([(m.A, m.B, m.scale) for m in lora.modules.values()])
    for (path, m), s in zip(lora.modules.items(), summaries, strict=True):
        alpha = m.scale * m.rank
        rows.append(
            (
                path,
                module_kind(path),
                layer_index(path),
                m.rank,
                alpha,
                m.scale,
                m.in_features,
                m.out_features,
                s.norm,
                s.sigma1,
                direction_bytes(s.direction),
            )
        )
        norms.setdefault(module_kind(path), []).append(s.norm)
    ranks = sorted({m.rank for m in lora.modules.values()})
    first = next(iter(lora.modules.values()))
    columns = {
        "base_model": lora.base_model,
        "ranks": ranks,
        "alphas": _distinct(m.scale * m.rank for m in lora.modules.values()),
        "targets": lora.module_kinds,
        "min_rank": ranks[0],
        "max_rank": ranks[-1],
        "num_modules": len(lora.modules),
        "num_params": lora.num_params,
        "dtype": str(first.A.dtype).removeprefix("torch."),
        "total_norm": math.sqrt(sum(v * v for vs in norms.values() for v in vs)),
        "norms": {
            kind: {
                "modules": len(vs),
                "mean": sum(vs) / len(vs),
                "max": max(vs),
                "total": math.sqrt(sum(v * v for v in vs)),
            }
            for kind, vs in sorted(norms.items())
        },
    }
    return columns, rows


def _peft_record(folder: Path, base: nn.Module | None, loader: Callable[..., LoRA]) -> Record:
    record = Record("peft")
    try:  # what the config says, even when the adapter cannot be used (DoRA, another type)
        raw = read_json_file(folder / (LORA_FORMAT.marker or ""), AdapterFormatError, what="adapter config")
        if isinstance(raw, dict):
            record.columns["peft_type"] = (
                raw.get("peft_type") if isinstance(raw.get("peft_type"), str) else None
            )
            base_name = raw.get("base_model_name_or_path")
            record.columns["base_model"] = base_name if isinstance(base_name, str) else None
    except LorafuseError:
        pass
    try:
        lora = loader(folder)
        if base is not None:
            check_compatible(lora, base, source=str(folder))
        columns, record.modules = summarize_lora(lora)
        record.columns.update(columns)
        del lora
    except LorafuseError as exc:
        record.status, record.problem, record.reason = "broken", _problem(exc), str(exc)
        record.modules = []
    return record


#: The catalogue columns a factored compressed delta takes from its LoRA summary.
_SUMMARY_COLUMNS = ("targets", "num_modules", "ranks", "min_rank", "max_rank", "alphas", "dtype")
_SUMMARY_COLUMNS += ("total_norm", "norms")


def _summarize_factored_delta(folder: Path, record: Record, base: nn.Module | None) -> None:
    """Norms and directions of a compressed delta of low-rank kinds, from its factors, and its
    fit to ``base`` (:func:`check_compatible`, as for a PEFT adapter)."""
    lora = load_compressed(folder).to_lora()
    if base is not None:
        check_compatible(lora, base, source=str(folder))
    columns, record.modules = summarize_lora(lora)
    record.columns.update({key: columns[key] for key in _SUMMARY_COLUMNS})


def _header_record(folder: Path, kind: str, base: nn.Module | None = None) -> Record:
    """A fusion or compressed delta, read from its JSON description and its safetensors header."""
    record = Record(kind)
    meta_path = folder / FORMATS[kind].header
    expected = FORMATS[kind].kind
    raw = read_json_file(meta_path, AdapterFormatError, what=f"{kind} description")
    if not isinstance(raw, dict) or raw.get("format") != expected:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise AdapterFormatError(f"{meta_path}: format is {found!r}, expected {expected!r}")
    info = raw.get("info") if isinstance(raw.get("info"), dict) else {}
    record.columns["method"] = raw.get("method") if isinstance(raw.get("method"), str) else None
    record.columns["num_params"] = raw.get("num_params") if isinstance(raw.get("num_params"), int) else None
    if kind == "fusion":
        weights = folder / "weights.safetensors"
        read_safetensors_header(weights)
        base_model = info.get("base_model")
        loras = raw.get("loras") if isinstance(raw.get("loras"), list) else []
        record.columns["info"] = {
            "version": raw.get("version"),
            "loras": [
                {"name": x.get("name"), "path": x.get("path"), "sha256": x.get("sha256")}
                for x in loras
                if isinstance(x, dict)
            ],
        }
    else:
        read_safetensors_header(folder / "delta.safetensors")
        base_model = info.get("base")
        modules = raw.get("modules") if isinstance(raw.get("modules"), dict) else {}
        for path, m in sorted(modules.items()):
            shape = m.get("shape") if isinstance(m, dict) else None
            if isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape):
                rank = (m.get("meta") or {}).get("rank") if isinstance(m.get("meta"), dict) else None
                record.modules.append(
                    (path, module_kind(path), layer_index(path), rank if isinstance(rank, int) else None,
                     None, None, shape[1], shape[0], None, None, None)
                )  # fmt: skip
        ranks = sorted({row[3] for row in record.modules if row[3] is not None})
        record.columns.update(
            targets=sorted({row[1] for row in record.modules}),
            num_modules=len(record.modules),
            ranks=ranks or None,
            min_rank=ranks[0] if ranks else None,
            max_rank=ranks[-1] if ranks else None,
            info={
                "version": raw.get("version"),
                "budget": raw.get("budget"),
                "nbytes": raw.get("nbytes"),
                "fp16_nbytes": raw.get("fp16_nbytes"),
                "params": raw.get("params"),
            },
        )
        kinds = {m.get("kind") if isinstance(m, dict) else None for m in modules.values()}
        if kinds and all(k in KINDS and KINDS[k].factored for k in kinds):
            _summarize_factored_delta(folder, record, base)
    record.columns["base_model"] = base_model if isinstance(base_model, str) else None
    return record


def summarize_folder(
    found: Found, *, base: nn.Module | None = None, loader: Callable[..., LoRA] | None = None
) -> Record:
    """Hash ``found``'s files and summarise the adapter; a broken one gets its problem and reason."""
    files: dict[str, tuple[int, int, str]] = {}
    for name, (size, mtime) in found.stats.items():
        try:
            files[name] = (size, mtime, _sha256_file(found.path / name))
        except OSError as exc:
            files[name] = (size, mtime, "")
            record = Record(found.kind, "broken", "format", f"{found.path / name}: cannot read: {exc}")
            record.files = files
            return record
    try:
        if found.kind == "peft":
            record = _peft_record(found.path, base, loader or load_lora)
        else:
            record = _header_record(found.path, found.kind, base)
    except LorafuseError as exc:
        record = Record(found.kind, "broken", _problem(exc), str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one unforeseen failure must not stop the index
        record = Record(
            found.kind, "broken", "error", f"{found.path}: unexpected {type(exc).__name__}: {exc}"
        )
    record.files = files
    return record


def _combined_sha(files: dict[str, tuple[int, int, str]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name][2]}\n".encode())
    return digest.hexdigest()


# -- indexing ------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    """What one ``index`` run did."""

    found: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    broken: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.found} adapters: {self.added} added, {self.updated} re-indexed, {self.unchanged} "
            f"unchanged, {self.removed} removed; {self.broken} broken; "
            f"{self.bytes_read / 1e6:.1f} MB read in {self.seconds:.2f} s"
        )


def _unique_name(con: sqlite3.Connection, name: str, path: str) -> str:
    row = con.execute("SELECT path FROM adapters WHERE name = ?", (name,)).fetchone()
    if row is None or row[0] == path:
        return name
    return f"{name}@{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _write(
    con: sqlite3.Connection, found: Found, record: Record, name: str, checked_base: str | None
) -> None:
    path = str(found.path)
    columns = dict(record.columns)
    for key in _JSON_COLUMNS:
        if columns.get(key) is not None:
            columns[key] = json.dumps(columns[key], sort_keys=True)
    columns |= {
        "name": name,
        "path": path,
        "kind": record.kind,
        "status": record.status,
        "problem": record.problem,
        "reason": record.reason,
        "sha256": _combined_sha(record.files),
        "bytes": sum(size for size, _, _ in record.files.values()),
        "checked_base": checked_base if record.kind in CHECKED_KINDS else None,
        "indexed_at": time.time(),
    }
    with _transaction(con):
        con.execute("DELETE FROM adapters WHERE path = ?", (path,))
        keys = sorted(columns)
        cursor = con.execute(
            f"INSERT INTO adapters ({', '.join(keys)}) VALUES ({', '.join('?' for _ in keys)})",
            [columns[k] for k in keys],
        )
        adapter_id = cursor.lastrowid
        con.executemany(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
            [(adapter_id, n, size, mtime, sha) for n, (size, mtime, sha) in sorted(record.files.items())],
        )
        con.executemany(
            "INSERT INTO modules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(adapter_id, *row) for row in record.modules],
        )


def _known(con: sqlite3.Connection) -> dict[str, tuple[str, dict[str, tuple[int, int]], str | None]]:
    """Path → (name, file stats, base fingerprint) of every catalogued adapter."""
    known: dict[str, tuple[str, dict[str, tuple[int, int]], str | None]] = {}
    for row in con.execute(
        "SELECT a.path, a.name, f.name, f.size, f.mtime_ns, a.checked_base "
        "FROM adapters a LEFT JOIN files f ON f.adapter_id = a.id"
    ):
        entry = known.setdefault(row[0], (row[1], {}, row[5]))
        if row[2] is not None:
            entry[1][row[2]] = (row[3], row[4])
    return known


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's adaptable layer shapes: adapters checked against it need no new check
    for another model of the same architecture."""
    from lorafuse.adapters.validate import linear_shape

    shapes = []
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            shapes.append((path, shape.out_features, shape.in_features))
    return hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()


def index(
    db: str | os.PathLike[str] | None,
    roots: Sequence[str | os.PathLike[str]],
    *,
    base: nn.Module | None = None,
    progress: bool = True,
    loader: Callable[..., LoRA] | None = None,
) -> IndexReport:
    """Index every adapter under ``roots`` into the catalogue ``db`` (incremental, resumable).

    ``base``: a model (weights may be on the ``meta`` device: only layer shapes are read); PEFT
    adapters that do not fit it are recorded as broken (``incompatible``). Unchanged adapters are
    checked again when ``base`` has other layer shapes than the model they were last checked
    against; without ``base``, earlier checks are kept. ``loader`` replaces
    :func:`~lorafuse.adapters.load_lora` (tests count its calls).
    """
    started = time.perf_counter()
    folders = [Path(r) for r in roots]
    for folder in folders:
        if not folder.is_dir():
            raise LibraryError(f"{folder}: no such folder to index")
    report = IndexReport()
    with closing(connect(db)) as con:
        known = _known(con)
        fingerprint = base_fingerprint(base) if base is not None else None
        found = list(discover(folders))
        report.found = len(found)
        todo = []
        for item in found:
            old = known.get(str(item.path))
            recheck = (
                item.kind in CHECKED_KINDS
                and fingerprint is not None
                and old is not None
                and old[2] != fingerprint
            )
            if old is not None and old[1] == item.stats and not recheck:
                report.unchanged += 1
            else:
                todo.append(item)
        bar = tqdm(todo, desc="index", unit="adapter", disable=not progress, leave=False)
        for item in bar:
            record = summarize_folder(item, base=base, loader=loader)
            old = known.get(str(item.path))
            name = old[0] if old is not None else _unique_name(con, item.name, str(item.path))
            _write(con, item, record, name, fingerprint)
            report.bytes_read += sum(size for size, _, _ in record.files.values())
            if old is None:
                report.added += 1
            else:
                report.updated += 1
        seen = {str(item.path) for item in found}
        resolved = [f.resolve() for f in folders]
        gone = [p for p in known if p not in seen and any(Path(p).is_relative_to(r) for r in resolved)]
        if gone:
            with _transaction(con):
                con.executemany("DELETE FROM adapters WHERE path = ?", [(p,) for p in gone])
        report.removed = len(gone)
        report.broken = con.execute("SELECT COUNT(*) FROM adapters WHERE status = 'broken'").fetchone()[0]
    report.seconds = time.perf_counter() - started
    return report


# -- queries -------------------------------------------------------------------------------------
def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_COLUMNS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


def parse_rank(text: str | None) -> tuple[int | None, int | None]:
    """``--rank``: ``8`` (exactly), ``4:16`` (inclusive), ``:16`` or ``32:``; on the largest rank."""
    if text is None:
        return None, None
    lo, sep, hi = text.partition(":")
    try:
        low = int(lo) if lo.strip() else None
        high = (int(hi) if hi.strip() else None) if sep else low
    except ValueError:
        raise LibraryError(f"--rank {text!r}: give N, MIN:MAX, :MAX or MIN: (whole numbers)") from None
    if (
        (low is not None and low < 1)
        or (high is not None and high < 1)
        or (sep and low is None and high is None)
    ):
        raise LibraryError(f"--rank {text!r}: ranks are whole numbers ≥ 1")
    if low is not None and high is not None and low > high:
        raise LibraryError(f"--rank {text!r}: the minimum is larger than the maximum")
    return low, high


def query(
    con: sqlite3.Connection,
    *,
    base: str | None = None,
    targets: Sequence[str] = (),
    rank: tuple[int | None, int | None] = (None, None),
    kind: str | None = None,
    status: str | None = "ok",
) -> list[dict[str, Any]]:
    """Adapters matching every filter, by name.

    ``base``: the recorded base model contains this text; ``targets``: the adapter adapts every
    one of these module kinds; ``rank``: its largest rank lies in ``[low, high]``; ``status``:
    ``ok``, ``broken`` or ``None`` (both).
    """
    where, args = [], []
    if base is not None:
        where.append("instr(coalesce(base_model, ''), ?) > 0")
        args.append(base)
    for target in targets:
        where.append("EXISTS (SELECT 1 FROM modules m WHERE m.adapter_id = a.id AND m.kind = ?)")
        args.append(target)
    if rank[0] is not None:
        where.append("max_rank >= ?")
        args.append(rank[0])
    if rank[1] is not None:
        where.append("max_rank <= ?")
        args.append(rank[1])
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    if status is not None:
        where.append("status = ?")
        args.append(status)
    sql = "SELECT * FROM adapters a" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY name"
    return [_row(r) for r in con.execute(sql, args)]


def get(con: sqlite3.Connection, name: str) -> dict[str, Any]:
    """One adapter with its files, its modules (without directions) and, for a fusion, which of its
    LoRAs the catalogue holds (matched by the SHA-256 of their weights)."""
    row = con.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
    if row is None:
        close = [
            r[0] for r in con.execute("SELECT name FROM adapters WHERE instr(name, ?) > 0 LIMIT 5", (name,))
        ]
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `lorafuse library ls`"
        raise LibraryError(f"no adapter named {name!r} in the catalogue{hint}")
    out = _row(row)
    out["files"] = {
        r["name"]: {"size": r["size"], "sha256": r["sha256"]}
        for r in con.execute("SELECT * FROM files WHERE adapter_id = ? ORDER BY name", (out["id"],))
    }
    out["modules"] = [
        {k: v for k, v in dict(r).items() if k not in ("adapter_id", "direction")}
        for r in con.execute("SELECT * FROM modules WHERE adapter_id = ? ORDER BY path", (out["id"],))
    ]
    if out["kind"] == "fusion" and out.get("info"):
        for entry in out["info"].get("loras", []):
            entry["in_catalogue"] = _match_hashes(con, entry.get("sha256") or {})
    return out


def _match_hashes(con: sqlite3.Connection, hashes: dict[str, str]) -> str | None:
    """The catalogue name of the adapter whose files have all these SHA-256s (usable ones first)."""
    weights = hashes.get("adapter_model.safetensors")
    if not isinstance(weights, str):
        return None
    for row in con.execute(
        "SELECT a.id, a.name FROM files f JOIN adapters a ON a.id = f.adapter_id "
        "WHERE f.name = 'adapter_model.safetensors' AND f.sha256 = ? ORDER BY a.status = 'ok' DESC, a.name",
        (weights,),
    ):
        held = {
            r[0]: r[1] for r in con.execute("SELECT name, sha256 FROM files WHERE adapter_id = ?", (row[0],))
        }
        if all(held.get(name) == sha for name, sha in hashes.items()):
            return str(row[1])
    return None


def stats(con: sqlite3.Connection) -> dict[str, Any]:
    """Counts by kind, status, problem, base model, module kind and largest rank; bytes and params."""
    rows = [_row(r) for r in con.execute("SELECT * FROM adapters")]
    ok = [r for r in rows if r["status"] == "ok"]
    target_counts: Counter[str] = Counter(t for r in ok for t in (r.get("targets") or []))
    return {
        "adapters": len(rows),
        "ok": len(ok),
        "broken": len(rows) - len(ok),
        "by_kind": dict(sorted(Counter(r["kind"] for r in rows).items())),
        "by_problem": dict(sorted(Counter(r["problem"] for r in rows if r["problem"]).items())),
        "by_base": dict(sorted(Counter(r["base_model"] or "(not recorded)" for r in ok).items())),
        "by_target": dict(sorted(target_counts.items())),
        "by_max_rank": {
            str(k): v for k, v in sorted(Counter(r["max_rank"] for r in ok if r["max_rank"]).items())
        },
        "bytes": sum(r["bytes"] for r in rows),
        "num_params": sum(r["num_params"] or 0 for r in ok),
        "schema_version": SCHEMA_VERSION,
    }
