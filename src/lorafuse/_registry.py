"""One registry for every method family (merge, compress, fuse, route): names, papers, settings.

Each family keeps one :class:`Registry` of its entries. An entry is any object with

- ``name``: the one canonical spelling, lower case with hyphens (``dare-ties``, ``delta-come``);
- ``paper``: the citation of the method's source (``"Yadav et al. 2023, TIES-Merging,
  arXiv:2306.01708"``), empty only for a baseline that has none;
- ``params``: its frozen pydantic settings model (a :class:`FrozenParams`);
- ``summary``: one line for listings and help;

plus whatever the family needs to run it (a merge function, a compressor, a routing rule): the
entry owns its behaviour, so callers look it up once and never switch on its name.

Old spellings stay accepted as aliases: every hyphenated name is also found under its underscore
spelling (``dare_ties`` → ``dare-ties``), and an entry may register more. Listings (iteration,
:meth:`Registry.names`, error messages, CLI choices) show only the canonical names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from lorafuse.errors import LorafuseError, UnknownMethodError

CANONICAL = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # one spelling per family: hyphens, lower case


class FrozenParams(BaseModel):
    """Base of every method's settings: frozen (hashable, never changed after validation), and
    unknown keys refused (a misspelt setting is an error, not silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoParams(FrozenParams):
    """The settings of a method that has none."""


class Entry(Protocol):
    """What every registered method exposes (read-only)."""

    @property
    def name(self) -> str: ...

    @property
    def paper(self) -> str: ...

    @property
    def params(self) -> type[FrozenParams]: ...

    @property
    def summary(self) -> str: ...


EntryT = TypeVar("EntryT", bound=Entry)


class Registry(Generic[EntryT]):
    """The entries of one method family, by canonical name, with aliases for old spellings.

    ``kind`` names the family in messages (``"merge method"``); ``error`` is the
    :class:`~lorafuse.errors.LorafuseError` subclass an unknown name raises (the CLI turns it into
    exit status 2). Behaves as a read-only mapping over the canonical names: ``name in reg``,
    ``reg[name]`` (aliases too), ``sorted(reg)``, ``reg.items()``.
    """

    def __init__(self, kind: str, error: type[LorafuseError] = UnknownMethodError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, EntryT] = {}
        self._aliases: dict[str, str] = {}  # alias → canonical name

    def register(self, entry: EntryT, *, aliases: Iterable[str] = ()) -> EntryT:
        """Add ``entry`` under its name, its underscore spelling and ``aliases``; refuse clashes."""
        name = entry.name
        if not CANONICAL.match(name):
            raise ValueError(f"{self.kind} name {name!r} is not canonical (lower case, words joined by '-')")
        if not issubclass(entry.params, FrozenParams):
            raise TypeError(f"{self.kind} {name!r}: params must subclass FrozenParams, got {entry.params}")
        extra = {a for a in (name.replace("-", "_"), *aliases) if a != name}
        for spelling in (name, *sorted(extra)):
            if spelling in self._entries or spelling in self._aliases:
                raise ValueError(f"{self.kind} {spelling!r} is registered twice")
        self._entries[name] = entry
        self._aliases.update(dict.fromkeys(extra, name))
        return entry

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` (itself or an alias); unknown names raise ``error``."""
        if isinstance(name, str):
            if name in self._entries:
                return name
            if name in self._aliases:
                return self._aliases[name]
        raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")

    def get(self, name: str) -> EntryT:
        """The entry called ``name`` (or one of its aliases); one clear error listing the choices."""
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """The canonical names, sorted (aliases are never listed)."""
        return sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        """``{alias: canonical name}``."""
        return dict(self._aliases)

    def items(self) -> list[tuple[str, EntryT]]:
        return [(name, self._entries[name]) for name in self.names()]

    def values(self) -> list[EntryT]:
        return [self._entries[name] for name in self.names()]

    def __getitem__(self, name: str) -> EntryT:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
