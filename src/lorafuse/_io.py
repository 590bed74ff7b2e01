"""File plumbing shared by every layer: safe safetensors reading and atomic output folders.

Safetensors files are validated before torch sees them (empty, truncated, unknown dtype), so a
bad file gets an error naming it instead of a stack trace from deep inside the loader. Outputs are
written to a temporary sibling folder and renamed into place, so a crash never leaves half a
folder behind and an existing output is only replaced once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lorafuse.errors import AdapterFormatError, LorafuseError, PickleRefusedError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header: sizes, offsets and dtypes, without reading data."""
    size = path.stat().st_size
    if size == 0:
        raise AdapterFormatError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes is too short for a safetensors file")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise AdapterFormatError(
                f"{path}: truncated safetensors file: the header claims {header_len} bytes but "
                f"only {size - 8} follow; the file was cut short (interrupted download or copy?)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"{path}: not a safetensors file (bad header: {exc})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    needed = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if needed > data_len:
        raise AdapterFormatError(
            f"{path}: truncated safetensors file: tensors need {needed} bytes of data but the "
            f"file holds {data_len}; the file was cut short (interrupted download or copy?)"
        )
    return header


def read_safetensors(path: Path, *, require_float: bool = True) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file on CPU, after validating it."""
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
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own untyped errors
        raise AdapterFormatError(f"{path}: cannot read safetensors file: {exc}") from None


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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise error(f"{path}: the file is empty")

    def _no_constants(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a {what}") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise error(f"{path}: invalid JSON: {exc}") from None


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of ``tensors`` (safetensors refuses shared or strided memory)."""
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
        str(path),
        metadata=metadata,
    )


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


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On error the temporary folder is removed and an existing ``out`` is left untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; pass overwrite=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
