"""The artefact protocol: one versioned header, one registry of formats, one atomic folder writer.

Every artefact lorafuse writes is a folder whose *header* names its kind and version::

    {"format": "<kind>", "version": <int>, ...fields, "versions": {library: version}}

The header is a JSON file of the folder (``fusion.json``, ``mixture.json``, ``encoder.json``,
``compressed.json``), or, for a PEFT LoRA folder, the JSON text under the key ``lorafuse`` of
``adapter_model.safetensors``' ``__metadata__``, which PEFT and vLLM ignore, so the folder stays
a plain PEFT adapter. A :class:`Format` names a kind, its current version, its header file and
the functions upgrading the fields of each older version ``v`` to ``v + 1``; reading a folder
applies them in turn, so a loader only ever sees the current layout. Folders of a kind written
before it had a header (any PEFT adapter) are recognised by a marker file and read as version 1.

Writes go through :func:`artefact_dir`: a temporary sibling folder renamed into place (see
:func:`lorafuse._io.atomic_output_dir`), an existing non-empty folder replaced only with
``overwrite=True``, and never an output that is, contains or lies inside one of the inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse._io import (
    OutputInputs,
    atomic_output_dir,
    read_json_file,
    read_safetensors_metadata,
    versions,
)
from lorafuse.errors import ArtefactError, LorafuseError

#: Header keys the protocol owns; a format's own fields never use them.
RESERVED = ("format", "version")
#: The ``__metadata__`` key of a safetensors header file holding the header's JSON text.
METADATA_KEY = "lorafuse"

#: Fields of version ``v`` (reserved keys removed) and the folder → fields of version ``v + 1``.
Upgrade = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclass(frozen=True)
class Format:
    """One on-disk artefact format.

    ``kind`` is the header's ``format`` value, ``version`` the one this lorafuse writes,
    ``header`` the file holding the header (``*.json``, or ``*.safetensors`` for a header in its
    metadata), ``upgrades[v]`` turns fields of version ``v`` into version ``v + 1`` (every
    version from ``oldest`` on is readable), ``marker`` a file identifying a folder of this kind
    written before it had a header (read as version 1 with no fields), ``error`` the error class
    raised for this format's folders, and ``noun`` the word used in messages.
    """

    kind: str
    version: int
    header: str
    noun: str
    error: type[ArtefactError] = ArtefactError
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)
    marker: str | None = None

    @property
    def oldest(self) -> int:
        """The oldest version this lorafuse reads (upgrading it step by step)."""
        oldest = self.version
        while oldest - 1 in self.upgrades:
            oldest -= 1
        return oldest

    def matches(self, folder: Path, names: Collection[str] | None = None) -> bool:
        """Whether ``folder`` holds this format's header file (or its pre-header marker); with
        ``names`` (the folder's file names, as ``os.walk`` lists them) nothing is asked of the disk."""
        wanted = self.marker if self.marker is not None else self.header
        return wanted in names if names is not None else (folder / wanted).is_file()


@dataclass(frozen=True)
class Header:
    """A header as read: its kind, the version found, the fields upgraded to the current version."""

    kind: str
    version: int  # the version in the folder (1 for a folder written before the kind had a header)
    fields: dict[str, Any]  # the current version's fields (reserved keys removed)
    path: Path  # the header file

    @property
    def folder(self) -> Path:
        return self.path.parent


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry (by kind) and return it; a module's ``FORMAT = register_format(...)``."""
    clash = [f.kind for f in FORMATS.values() if f.kind != fmt.kind and f.header == fmt.header]
    if clash:
        raise ValueError(f"{fmt.kind}: header file {fmt.header} is already the header of {clash[0]}")
    FORMATS[fmt.kind] = fmt
    return fmt


def get_format(kind: str) -> Format:
    """The registered format of ``kind``; :class:`ArtefactError` naming the known kinds otherwise."""
    if kind not in FORMATS:
        raise ArtefactError(f"unknown artefact kind {kind!r}; known kinds: {', '.join(sorted(FORMATS))}")
    return FORMATS[kind]


def find_format(folder: str | os.PathLike[str], names: Collection[str] | None = None) -> Format | None:
    """The format whose header file (or marker) ``folder`` holds, ``None`` if it holds none; an
    :class:`ArtefactError` when it holds the headers of several. The one way every reader (the
    loaders, the server's folder scan, the library's catalogue) tells what a folder is. ``names``:
    the folder's file names when the caller has listed them already (a walk)."""
    folder = Path(folder)
    found = [f for f in FORMATS.values() if f.marker is None and f.matches(folder, names)]
    if not found:  # only then a marker (a PEFT adapter beside another artefact's header is its part)
        found = [f for f in FORMATS.values() if f.marker is not None and f.matches(folder, names)]
    if len(found) > 1:
        raise ArtefactError(
            f"{folder}: holds the headers of several artefacts ({', '.join(f.header for f in found)}); "
            "an artefact folder holds one"
        )
    return found[0] if found else None


def detect_format(folder: str | os.PathLike[str]) -> Format:
    """The format whose header file ``folder`` holds; one :class:`ArtefactError` naming it otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtefactError(f"{folder}: not a folder; a lorafuse artefact is a folder with a header file")
    fmt = find_format(folder)
    if fmt is None:
        names = sorted({f.marker or f.header for f in FORMATS.values()})
        raise ArtefactError(f"{folder}: not a lorafuse artefact folder: none of {', '.join(names)} is in it")
    return fmt


def header_text(kind: str, version: int, fields: Mapping[str, Any]) -> str:
    """The header as JSON text: ``format``, ``version``, the fields, then the library ``versions``."""
    reserved = sorted(set(RESERVED) & set(fields))
    if reserved:
        raise ValueError(f"header fields {reserved} are reserved for the protocol")
    body = {"format": kind, "version": version, **fields}
    body.setdefault("versions", versions())
    try:
        return json.dumps(body, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:  # NaN or inf in a field: the folder would be unreadable
        raise ArtefactError(f"cannot write the {kind} header: {exc}; every number must be finite") from None


def write_header(folder: str | os.PathLike[str], kind: str, version: int, fields: Mapping[str, Any]) -> Path:
    """Write the JSON header file of format ``kind`` into ``folder``; returns its path.

    (A header kept in safetensors metadata is written with the tensors: :func:`header_metadata`.)
    """
    fmt = get_format(kind)
    if not fmt.header.endswith(".json"):
        raise ValueError(f"{kind} keeps its header in {fmt.header}; write it with header_metadata()")
    path = Path(folder) / fmt.header
    path.write_text(header_text(kind, version, fields))
    return path


def header_metadata(kind: str, version: int, fields: Mapping[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` entry holding the header, for a format whose header file is safetensors."""
    return {METADATA_KEY: header_text(kind, version, fields)}


def _raw_header(fmt: Format, path: Path) -> Any:
    """The parsed header of ``fmt`` at ``path``, or ``None`` for a folder written before headers."""
    if path.suffix == ".safetensors":
        if not path.is_file():
            return None
        text = read_safetensors_metadata(path).get(METADATA_KEY)
        if text is None:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise fmt.error(f"{path}: __metadata__.{METADATA_KEY}: invalid JSON ({exc})") from None
    if not path.is_file():
        raise fmt.error(f"{path.parent}: not a {fmt.noun} folder: {path.name} is missing")
    return read_json_file(path, fmt.error, what=f"{fmt.noun} header")


def _version(fmt: Format, raw: dict[str, Any], path: Path) -> int:
    version = raw.get("version")
    if "version" not in raw:
        raise fmt.error(f"{path}: version: missing; a {fmt.kind} header names its version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fmt.error(f"{path}: version: expected a whole number ≥ 1, got {version!r}")
    if version > fmt.version:
        raise fmt.error(
            f"{path}: version {version} of {fmt.kind} is newer than this lorafuse reads (up to "
            f"{fmt.version}); upgrade lorafuse to read it"
        )
    if version < fmt.oldest:
        raise fmt.error(
            f"{path}: version {version} of {fmt.kind} is older than this lorafuse reads (from {fmt.oldest})"
        )
    return version


def read_header(folder: str | os.PathLike[str], kind: str | None = None) -> Header:
    """Read and upgrade the header of ``folder`` (of format ``kind``, or whichever it holds).

    Every problem is one error of the format's class (an :class:`ArtefactError`) naming the
    header file and the field: a missing or malformed header, a ``format``
    that is not a string, not a known kind or not the expected one, a ``version`` that is not a
    whole number, newer than this lorafuse reads or older than the oldest it upgrades.
    """
    folder = Path(folder)
    fmt = get_format(kind) if kind is not None else detect_format(folder)
    error = fmt.error
    path = folder / fmt.header
    if kind is not None and not folder.is_dir():
        raise error(f"{folder}: not a {fmt.noun} folder (not a folder at all)")
    raw = _raw_header(fmt, path)
    if raw is None:
        if fmt.marker is None or not (folder / fmt.marker).is_file():
            raise error(f"{folder}: not a {fmt.noun} folder: {fmt.marker or fmt.header} is missing")
        version, fields = 1, {}
    else:
        if not isinstance(raw, dict):
            raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
        found = raw.get("format")
        if not isinstance(found, str):
            raise error(f"{path}: format: expected a kind name (text), got {found!r}; expected {fmt.kind!r}")
        if found != fmt.kind:
            known = found in FORMATS
            raise error(
                f"{path}: format is {found!r}"
                + ("" if known else " (an unknown artefact kind)")
                + f", expected {fmt.kind!r}"
            )
        version = _version(fmt, raw, path)
        fields = {k: v for k, v in raw.items() if k not in RESERVED}
    for step in range(version, fmt.version):
        try:
            fields = fmt.upgrades[step](fields, folder)
        except LorafuseError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise error(f"{path}: cannot upgrade version {step} to {step + 1}: {exc}") from None
    return Header(fmt.kind, version, fields, path)


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextmanager
def artefact_dir(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    inputs: OutputInputs = (),
    what: str = "output",
) -> Iterator[Path]:
    """The folder every artefact is written in: a temporary sibling renamed to ``out`` on success.

    ``out`` may be missing or an empty folder; a non-empty one is replaced only with
    ``overwrite`` (else :class:`~lorafuse.errors.OutputExistsError`). ``out`` must never be,
    contain or lie inside one of ``inputs`` (:class:`~lorafuse.errors.OutputPathError`). A failed
    write leaves no partial folder and an existing ``out`` untouched.
    """
    out = Path(out)
    with atomic_output_dir(
        out, overwrite=overwrite or _is_empty_folder(out), inputs=inputs, what=what
    ) as tmp:
        yield tmp
