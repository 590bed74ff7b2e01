"""File plumbing shared by every layer: safe safetensors reading and atomic output folders.

Safetensors files are validated before torch sees them (empty, truncated, unknown dtype), so a
bad file gets an error naming it instead of a stack trace from deep inside the loader. Outputs are
written to a temporary sibling folder and renamed into place, so a crash never leaves half a
folder behind and an existing output is only replaced once the new one is complete. An output is
never allowed to be, contain or lie inside one of the inputs it is made from, and what a killed
writer left beside an output is repaired by the next write to it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lorafuse.errors import (
    AdapterFormatError,
    LorafuseError,
    OutputExistsError,
    OutputPathError,
    PickleRefusedError,
)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


# Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (``true`` and ``4.0`` are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: object, data_len: int) -> None:
    """One tensor entry of a header: ``{"dtype", "shape", "data_offsets"}``, sizes consistent."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise AdapterFormatError(f"{where}: header entry is a {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise AdapterFormatError(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise AdapterFormatError(
            f"{where}: unknown dtype {dtype!r}; safetensors dtypes are {', '.join(DTYPE_SIZES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise AdapterFormatError(
            f"{where}: data_offsets must be two non-negative integers [begin, end], got {offsets!r}"
        )
    begin, end = offsets
    if begin > end:
        raise AdapterFormatError(f"{where}: data_offsets {offsets} end before they begin")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise AdapterFormatError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes but shape {shape} of "
            f"{dtype} needs {numel * DTYPE_SIZES[dtype]}; the header is inconsistent"
        )
    if end > data_len:
        raise AdapterFormatError(
            f"{path}: truncated safetensors file: tensors need {end} bytes of data but the "
            f"file holds {data_len}; the file was cut short (interrupted download or copy?)"
        )


def _parse_header(path: Path, size: int) -> tuple[int, Any]:
    """The header length and the parsed (not yet checked) JSON header of a safetensors file."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise AdapterFormatError(
                f"{path}: truncated safetensors file: the header claims {header_len} bytes but "
                f"only {size - 8} follow; the file was cut short (interrupted download or copy?)"
            )
        if header_len > MAX_HEADER_BYTES:
            raise AdapterFormatError(
                f"{path}: not a safetensors file (a {header_len}-byte header; the limit is "
                f"{MAX_HEADER_BYTES})"
            )
        text = f.read(header_len)
    try:
        return header_len, json.loads(text)
    except RecursionError:
        raise AdapterFormatError(f"{path}: not a safetensors file (header nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: not a safetensors file (bad header: {exc})") from None


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header: sizes, offsets and dtypes, without reading data.

    Every failure is an :class:`AdapterFormatError` naming the file (and the tensor): a missing,
    unreadable, empty or truncated file; a header that is not a JSON object, or whose entries
    are not objects with a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` of two ordered non-negative integers spanning exactly the shape's bytes.
    """
    return _checked_header(path)[0]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when absent), after checking the whole header.

    Metadata values must be strings (as the format defines them); anything else is an
    :class:`AdapterFormatError` naming the file and the key.
    """
    metadata = _checked_header(path)[1]
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise AdapterFormatError(
                f"{path}: __metadata__.{key} is a {type(value).__name__}; metadata values are strings"
            )
    return metadata


def _checked_header(path: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """The checked tensor entries and the metadata of a safetensors file."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise AdapterFormatError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes is too short for a safetensors file")
    try:
        header_len, header = _parse_header(path, size)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(
            f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, not an object)"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise AdapterFormatError(f"{path}: __metadata__ is a {type(metadata).__name__}, not an object")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        _check_entry(path, name, entry, data_len)
    return header, metadata or {}


def read_safetensors(
    path: Path, *, require_float: bool = True, require_finite: bool = False
) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file on CPU, after validating it.

    ``require_finite`` also refuses a floating-point tensor holding NaN or ±inf, naming it.
    """
    header = read_safetensors_header(path)
    if require_float:
        bad = {k: v["dtype"] for k, v in header.items() if v["dtype"] not in FLOAT_DTYPES}
        if bad:
            listing = ", ".join(f"{k} ({d})" for k, d in sorted(bad.items())[:5])
            raise AdapterFormatError(
                f"{path}: expected floating-point tensors (F32, F16, BF16, F64), found {listing}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own untyped errors
        raise AdapterFormatError(f"{path}: cannot read safetensors file: {exc}") from None
    if require_finite:
        check_finite(tensors, path)
    return tensors


def all_finite(tensor: Tensor) -> bool:
    """Whether every value of a floating-point ``tensor`` is finite (no NaN, no ±inf).

    One sum first (float32, float64 for float64 tensors): NaN and ±inf make any sum non-finite,
    so a finite sum proves every value finite, several times faster than ``isfinite(t).all()``
    (no boolean tensor). Only a non-finite sum, which an overflow of large finite values can
    also give, is checked value by value."""
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        if math.isfinite(float(total)):
            return True
    return bool(torch.isfinite(tensor).all())


def check_finite(
    tensors: dict[str, Tensor], path: Path | str, error: type[LorafuseError] = AdapterFormatError
) -> None:
    """Raise ``error`` naming the first floating-point tensor of ``tensors`` that holds NaN or ±inf."""
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() and not all_finite(tensor):
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                raise error(
                    f"{path}: tensor {name!r} {tuple(tensor.shape)} has {int((~finite).sum())} "
                    "non-finite values (NaN/inf); the file is corrupt or its training diverged"
                )


def read_pickle_weights(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    """Load a ``.bin``/``.pt`` state dict, only when the caller opted in, with ``weights_only``."""
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path}: pickle-based weights are refused by default because loading pickle can run "
            "arbitrary code. Convert the adapter to safetensors, or pass allow_pickle=True "
            "(--allow-pickle) if you trust the file; it is then loaded with weights_only=True."
        )
    if path.stat().st_size == 0:
        raise AdapterFormatError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFormatError(f"{path}: cannot load with weights_only=True: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state


MAX_JSON_BYTES = 64 * 1024 * 1024  # a config or metadata file larger than this is not one


def read_json_file(
    path: Path, error: type[LorafuseError] = AdapterFormatError, *, what: str = "JSON file"
) -> Any:
    """Parse a small JSON file (a config, a manifest), every failure one ``error`` naming the file.

    Refused with a clear message: a missing or empty file, one larger than ``MAX_JSON_BYTES``,
    text that is not UTF-8 (UTF-16 and Latin-1 configs included), invalid JSON, JSON nested so
    deep that the parser recurses out of stack, and ``NaN`` / ``Infinity`` literals (not JSON).
    """
    if not path.is_file():
        raise error(f"{path}: missing {what}")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{path}: the file is empty")
    if size > MAX_JSON_BYTES:
        raise error(f"{path}: {size} bytes is too large for a {what} (limit {MAX_JSON_BYTES})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise error(f"{path}: the file is empty")

    try:
        data = json.loads(text, parse_constant=_Constant)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a {what}") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise error(f"{path}: invalid JSON: {exc}") from None
    found = _first_non_finite(data)
    if found is not None:
        where, value = found
        problem = (
            f"{value.name} is not a JSON number"
            if isinstance(value, _Constant)
            else "a number too large for a float (it overflows to infinity)"
        )
        raise error(f"{path}: {where}: {problem}; every number must be finite")
    return data


class _Constant(float):
    """``NaN`` / ``Infinity`` / ``-Infinity`` read from JSON text (remembered to name it)."""

    name: str

    def __new__(cls, name: str) -> _Constant:
        value = super().__new__(cls, name)
        value.name = name
        return value


def _first_non_finite(data: Any) -> tuple[str, float] | None:
    """``(where, value)`` of the first NaN/inf float inside parsed JSON (``a.b[2]``), else None.

    Iterative, so data nested as deep as the parser allows is walked without recursion.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "value", value
        if isinstance(value, dict):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of ``tensors`` (safetensors refuses shared or strided memory).

    safetensors creates the file 0600; it is given the mode the umask asks for, like any file.
    """
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
        str(path),
        metadata=metadata,
    )
    os.chmod(path, 0o666 & ~current_umask())


def lorafuse_home() -> Path:
    """``$LORAFUSE_HOME``, default ``~/.cache/lorafuse``: where built and converted things are cached."""
    return Path(os.environ.get("LORAFUSE_HOME", Path.home() / ".cache" / "lorafuse"))


def versions() -> dict[str, str]:
    """Versions of Python and the libraries results depend on, for records beside outputs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("lorafuse", "torch", "transformers", "peft", "safetensors"):
        with suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- Output paths -------------------------------------------------------------------------------
#
# Every writer goes through `atomic_output_dir` (folders) or `write_text_atomic` (single files):
# the output is checked against the command's inputs, leftovers of an interrupted earlier write are
# recovered, the new output is built in a temporary sibling and renamed into place, and an existing
# output is only removed once the new one stands under its name.

#: The inputs of a writer: paths, ``(label, path)`` pairs or ``{label: path}`` (the label, e.g.
#: ``--finetuned``, is shown in messages). ``None`` entries are skipped, so optional inputs can be
#: passed as they are.
_InputPath = str | os.PathLike[str] | None
OutputInputs = Mapping[str, _InputPath] | Iterable[_InputPath | tuple[str, _InputPath]]

_log = logging.getLogger(__name__)
_LEFTOVER = re.compile(r"(tmp|old)-(\d+)(?:-[A-Za-z0-9_]+)?")
_CONSEQUENCE = {
    "is": "writing it would replace that input",
    "contains": "replacing it would delete that input",
    "lies inside": "writing it would change that input",
}


def _path_forms(path: Path) -> list[Path]:
    """The absolute path as written and, if different, the one with every symlink followed."""
    written = Path(os.path.abspath(path))
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: only the written form can be compared
        return [written]
    return [written] if resolved == written else [written, resolved]


def combine_inputs(*groups: OutputInputs) -> list[tuple[str | None, Path]]:
    """One list of ``(label or None, path)`` from several groups of inputs; missing paths dropped.

    A path that does not exist (a hub model id recorded as the base, a file not made yet) holds
    nothing that could be lost, so it is not kept.
    """
    found: list[tuple[str | None, Path]] = []
    for group in groups:
        if isinstance(group, str | os.PathLike):  # one path, not an iterable of characters
            group = [group]
        items = group.items() if isinstance(group, Mapping) else group
        for item in items:
            label, path = item if isinstance(item, tuple) else (None, item)
            if path is not None and os.fspath(path) != "" and os.path.lexists(path):
                found.append((label, Path(path)))
    return found


def check_output_path(out: str | os.PathLike[str], inputs: OutputInputs, *, what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``--force`` or not).

    Paths are compared both as written (made absolute) and with symlinks followed, so an output
    that is a symlink to an input, an input that is a symlink into the output, and ``..`` tricks
    are all caught. Inputs that do not exist are skipped. Raises :class:`OutputPathError` naming
    the output and the input.
    """
    out = Path(out)
    out_forms = _path_forms(out)
    for label, source in combine_inputs(inputs):
        source_forms = _path_forms(source)
        for o in out_forms:
            for i in source_forms:
                if o == i:
                    relation = "is"
                elif o.is_relative_to(i):
                    relation = "lies inside"
                elif i.is_relative_to(o):
                    relation = "contains"
                else:
                    continue
                named = f"{label} {source}" if label else f"{source}"
                via = ""
                if (o, i) != (out_forms[0], source_forms[0]):
                    via = f" (following symlinks: {o} and {i})"
                raise OutputPathError(
                    f"{what} {out} {relation} the input {named}{via}; {_CONSEQUENCE[relation]}. "
                    f"Inputs are never modified: choose another {what}"
                )


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``).

    Elsewhere it is read by setting it and restoring it at once; the value set meanwhile is the
    restrictive ``0o077``, so a file another thread creates in that instant is only more private.
    """
    with suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (a process of another user counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:  # never written by lorafuse; leave such a folder alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # not a possible process id
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def _remove(path: Path) -> bool:
    """Delete a file, symlink or folder tree; whether it is gone."""
    if path.is_symlink() or not path.is_dir():
        with suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def recover_leftovers(out: str | os.PathLike[str]) -> None:
    """Repair what an interrupted write to ``out`` left beside it (by a process no longer running).

    * ``.NAME.old-PID*`` while ``NAME`` is missing: the process died between the two renames of a
      replace; the previous output is restored under ``NAME``.
    * ``.NAME.old-PID*`` while ``NAME`` exists: the new output was in place, only the deletion of
      the previous one was missed; it is deleted.
    * ``.NAME.tmp-PID-*``: an unfinished output; it is deleted.

    Leftovers of a running process (it may be writing right now) are left alone. Each repair is
    reported as a warning on the ``lorafuse._io`` logger (shown on stderr by default).
    """
    target = Path(os.path.abspath(out))
    parent, prefix = target.parent, f".{target.name}."
    if not target.name or not parent.is_dir():
        return
    olds: list[Path] = []
    tmps: list[Path] = []
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        match = _LEFTOVER.fullmatch(entry.name[len(prefix) :])
        if match is None or _pid_alive(int(match.group(2))):
            continue
        (olds if match.group(1) == "old" else tmps).append(entry)
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.lstat().st_mtime_ns)
        with suppress(OSError):
            os.replace(newest, target)
            olds.remove(newest)
            _log.warning(
                "%s: restored the previous output from %s (a replace was interrupted before the "
                "new output was in place)",
                target,
                newest.name,
            )
    if os.path.lexists(target):
        for old in olds:
            if _remove(old):
                _log.warning(
                    "%s: removed %s, the previous output left by an interrupted replace", target, old.name
                )
    for tmp in tmps:
        if _remove(tmp):
            _log.warning(
                "%s: removed %s, an unfinished output of a process that no longer runs", target, tmp.name
            )


def prepare_output(
    out: str | os.PathLike[str], inputs: OutputInputs = (), *, overwrite: bool, what: str = "output"
) -> Path:
    """Everything to check before work starts on the output folder ``out``; returns ``out``.

    The guard against overwriting an input (:func:`check_output_path`), recovery of an interrupted
    earlier write (:func:`recover_leftovers`), then :class:`OutputExistsError` when ``out`` is not
    a folder, or exists and ``overwrite`` is false.
    """
    out = Path(out)
    check_output_path(out, inputs, what=what)
    recover_leftovers(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(f"{what} {out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{what} {out}: exists; pass overwrite=True (--force) to replace it")
    return out


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask asks for.

    ``mkdtemp`` makes the folder 0700 and some writers (safetensors) create their files 0600
    whatever the umask; what was just written is set to ``0o777`` (folders, executables) or
    ``0o666`` (other files) less the umask. Symlinks are left alone.
    """
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is renamed aside first, deleted last."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)  # if this fails, the next write to ``target`` deletes it


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    inputs: OutputInputs = (),
    what: str = "output",
) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` by renames.

    First :func:`prepare_output` (``out`` must not be, contain or lie inside any of ``inputs``).
    On error the temporary folder is removed and an existing ``out`` is left untouched; at no
    moment is there nothing under the name ``out`` that a later write could not restore (see
    :func:`recover_leftovers`). The folder and its files get the modes the umask gives (not
    ``mkdtemp``'s 0700 or safetensors' 0600).
    """
    prepare_output(out, inputs, overwrite=overwrite, what=what)
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def record_path(recorded: str) -> str:
    """``recorded`` made absolute (resolved) when it names an existing path from the current
    folder, so a description written beside an output works from any folder; otherwise (a hub
    model id, a path that is gone) kept as written."""
    path = Path(recorded)
    return str(path.resolve()) if not path.is_absolute() and path.exists() else recorded


def resolve_recorded_path(recorded: str, folder: Path) -> str:
    """A path read from a description in ``folder``: relative ones are tried from ``folder``,
    then from the current folder (descriptions written before paths were recorded absolute);
    names that exist in neither are kept as written."""
    path = Path(recorded)
    if path.is_absolute():
        return recorded
    for candidate in (folder / path, path):
        if candidate.exists():
            return str(candidate.resolve())
    return recorded


def write_text_atomic(
    path: str | os.PathLike[str],
    text: str,
    *,
    inputs: OutputInputs = (),
    what: str = "output",
    encoding: str = "utf-8",
) -> Path:
    """Write the file ``path`` through a temporary sibling and one rename (mode from the umask).

    ``path`` must not be, contain or lie inside any of ``inputs`` (:func:`check_output_path`).
    """
    path = Path(path)
    check_output_path(path, inputs, what=what)
    recover_leftovers(path)
    if path.is_dir():
        raise OutputExistsError(f"{what} {path}: is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with tmp.open("x", encoding=encoding) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path
