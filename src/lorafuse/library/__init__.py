"""The adapter library: a SQLite catalogue of LoRA folders, and choosing adapters for a task.

:mod:`~lorafuse.library.catalog` indexes folders of adapters (incremental, resumable, one adapter
in memory at a time); :mod:`~lorafuse.library.select` ranks the catalogue's adapters for a base
model and a few examples (by loss through the serving pool, Arrow-style similarity, norm or at
random); :mod:`~lorafuse.library.summary` holds the factored per-module maths.
"""

from lorafuse.library.catalog import (
    SCHEMA_VERSION,
    IndexReport,
    LibraryError,
    connect,
    default_db,
    get,
    index,
    parse_rank,
    query,
    stats,
)
from lorafuse.library.select import BY, Selection, read_selection, select, write_selection
from lorafuse.library.summary import ModuleSummary, summarize_factors

__all__ = [
    "BY",
    "SCHEMA_VERSION",
    "IndexReport",
    "LibraryError",
    "ModuleSummary",
    "Selection",
    "connect",
    "default_db",
    "get",
    "index",
    "parse_rank",
    "query",
    "read_selection",
    "select",
    "stats",
    "summarize_factors",
    "write_selection",
]
