"""Checks of command-line values shared by every verb: numbers, choices, lists, settings, dtypes, devices.

A bad value is refused where it enters, before any model or file is loaded: most checks run as
typer callbacks (``typer.Option(callback=COUNT)``), the rest at the top of a command. Each raises
:class:`~lorafuse._checks.InvalidValueError` naming the flag and the value, which
:func:`lorafuse.cli.main` prints as one ``error: ...`` line with exit status 2.

The rules are the same for every verb: counts (steps, batch sizes, ranks, limits) are whole
numbers ≥ 1; seeds are whole numbers in ``[0, 2**32 - 1]`` (numpy's legacy generator, used by
LoraHub's search, takes no more); rates, temperatures and epochs are finite and > 0; dtypes are
``float32``, ``float16`` or ``bfloat16``; a device is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or
``mps`` and must exist on this machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from pydantic import BaseModel, ValidationError

from lorafuse._checks import MAX_MAGNITUDE, InvalidValueError, check_number

if TYPE_CHECKING:
    import torch

    from lorafuse._io import OutputInputs

__all__ = [
    "COUNT",
    "COUNT_MAX",
    "DATA",
    "DEVICE",
    "DTYPE",
    "DTYPES",
    "FILE",
    "FOLDER",
    "NON_NEGATIVE",
    "NON_NEGATIVE_COUNT",
    "POSITIVE",
    "SEED",
    "SEED_MAX",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_out",
    "check_settings",
    "choice",
    "flag_of",
    "names_of",
    "number",
    "parse_floats",
    "parse_ints",
    "parse_names",
    "parse_settings",
    "read_examples",
    "read_text",
    "torch_dtype",
    "world_composites",
    "world_profiles",
    "world_tasks",
]

SEED_MAX = 2**32 - 1
COUNT_MAX = 2**31 - 1  # no count of steps, rows or tokens is larger; bigger ints overflow torch's
DTYPES = ("float32", "float16", "bfloat16")

Callback = Callable[[typer.Context, typer.CallbackParam, Any], Any]
Choices = Sequence[str] | Callable[[], Sequence[str]]


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flag_of(param: click.Parameter) -> str:
    """The name a user typed for ``param``: its longest ``--`` option (``--out`` rather than ``-o``)."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return max(longs, key=len) if longs else (param.opts[0] if param.opts else str(param.name))


def number(
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Callback:
    """A typer callback refusing a value outside ``[low, high]`` (:func:`check_number`); ``None`` passes."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        return check_number(
            value,
            flag_of(param),
            integer=integer,
            low=low,
            high=high,
            low_open=low_open,
            high_open=high_open,
        )

    return check


COUNT = number(integer=True, low=1, high=COUNT_MAX)
NON_NEGATIVE_COUNT = number(integer=True, low=0, high=COUNT_MAX)
SEED = number(integer=True, low=0, high=SEED_MAX)
POSITIVE = number(low=0, low_open=True, high=MAX_MAGNITUDE)
NON_NEGATIVE = number(low=0, high=MAX_MAGNITUDE)


def _choices(choices: Choices) -> list[str]:
    return list(choices() if callable(choices) else choices)


def check_choice(value: str, flag: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else an error listing them."""
    allowed = list(choices)
    if value not in allowed:
        raise InvalidValueError(f"{flag} must be one of {', '.join(allowed)}; got {_shown(value)}")
    return value


def choice(choices: Choices) -> Callback:
    """A typer callback accepting only ``choices`` (a list, or a function giving it, to import lazily)."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        return check_choice(value, flag_of(param), _choices(choices))

    return check


def registry_choice(registry: Callable[[], Any]) -> Callback:
    """A typer callback taking one name of a method registry (imported lazily by ``registry()``):
    the canonical name, old spellings (``dare_ties``, ``cat`` for ``cat-weights``) accepted."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        entries = registry()
        return check_choice(entries.aliases().get(value, value), flag_of(param), entries.names())

    return check


def parse_names(text: str, flag: str, choices: Iterable[str] | None = None) -> list[str]:
    """A comma-separated list of names (each one of ``choices`` when given); never empty."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InvalidValueError(f"{flag} needs at least one name, got {_shown(text)}")
    if choices is not None:
        allowed = list(choices)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise InvalidValueError(
                f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}"
            )
    return names


def names_of(choices: Choices) -> Callback:
    """A typer callback checking a comma-separated list against ``choices``; the text is kept as given."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        parse_names(value, flag_of(param), _choices(choices))
        return value

    return check


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """Comma-separated finite numbers of magnitude ≤ 1e6 (weights: any sign), or ``None``."""
    if text is None:
        return None
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise InvalidValueError(f"{flag} must be comma-separated numbers, got {_shown(text)}") from None
        values.append(check_number(value, flag, low=-MAX_MAGNITUDE, high=MAX_MAGNITUDE))
    return values


def parse_ints(text: str, flag: str, *, low: int = 0, high: int = SEED_MAX) -> list[int]:
    """Comma-separated whole numbers in ``[low, high]`` (seeds by default); never empty."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise InvalidValueError(
                f"{flag} must be comma-separated whole numbers, got {_shown(text)}"
            ) from None
        values.append(int(check_number(value, flag, integer=True, low=low, high=high)))
    if not values:
        raise InvalidValueError(f"{flag} needs at least one number, got {_shown(text)}")
    return values


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN / ±inf anywhere inside a YAML value (numbers, lists, mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValueError(f"{where} must be a finite number, got {value}")
    if isinstance(value, list):
        for item in value:
            _check_finite(item, where)
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item, where)


def parse_settings(pairs: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE read as YAML: ``0.5``, ``true``, ``[1, 2]``) → ``{key: value}``.

    Dashes in keys become underscores (``--set n-init=5`` is ``n_init``); a key given twice, a
    value that is not YAML, or a NaN / infinite number is refused.
    """
    import yaml

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidValueError(f"{flag} takes KEY=VALUE, got {_shown(pair)}")
        if key in settings:
            raise InvalidValueError(f"{flag} {key}: given twice")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InvalidValueError(
                f"{flag} {key}: {_shown(text)} is not a value (a number, word or list)"
            ) from None
        _check_finite(value, f"{flag} {key}")
        settings[key] = value
    return settings


def check_settings(
    model: type[BaseModel],
    params: Mapping[str, Any],
    owner: str,
    flags: Mapping[str, str] | None = None,
    *,
    where: str = "--set ",
) -> None:
    """Validate a method's settings against its pydantic ``model`` before any work is done.

    Strict: ``true`` is not a number and ``1`` is not a boolean. The message names the flag
    that gave the bad setting (``flags``: field → flag; otherwise ``where`` + the field, as in
    ``--set n_init``) and its value.
    """
    try:
        model.model_validate(dict(params), strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first.get("loc") else "?"
        flag = (flags or {}).get(field, f"{where}{field}")
        if first.get("type") == "extra_forbidden":
            known = ", ".join(model.model_fields) or "none"
            raise InvalidValueError(
                f"{flag}: {owner} has no setting {field!r} (its settings: {known})"
            ) from None
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidValueError(f"{flag}: {message} (got {_shown(first.get('input'))})") from None


def check_dtype(name: str, flag: str = "--dtype") -> str:
    """``name`` if it is a floating dtype lorafuse computes in (float32, float16, bfloat16)."""
    return check_choice(name, flag, DTYPES)


def torch_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The ``torch.dtype`` called ``name`` (one of :data:`DTYPES`), else an error listing them."""
    import torch

    return getattr(torch, check_dtype(name, flag))


def check_device(name: str, flag: str = "--device") -> str:
    """``name`` if it is ``auto`` or a device of this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InvalidValueError(f"{flag} must be auto, cpu, cuda, cuda:N or mps; got {_shown(name)}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidValueError(f"{flag} {name}: CUDA is not available on this machine; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise InvalidValueError(
                f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidValueError(f"{flag} {name}: MPS is not available on this machine; use cpu or auto")
    return name


def _paths(value: Any) -> list[Path]:
    return [Path(v) for v in value] if isinstance(value, list | tuple) else [Path(value)]


def _folder_callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    for path in _paths(value):
        if not path.is_dir():
            what = "not a folder" if path.exists() else "no such folder"
            raise InvalidValueError(f"{flag_of(param)} {path}: {what}")
    return value


def _file_callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    for path in _paths(value):
        if not path.is_file():
            what = "not a file" if path.exists() else "no such file"
            raise InvalidValueError(f"{flag_of(param)} {path}: {what}")
    return value


FOLDER: Callback = _folder_callback
"""An existing folder (or each of a repeated option's folders)."""
FILE: Callback = _file_callback
"""An existing file (or each of a repeated option's files)."""


def read_text(path: Path, flag: str) -> str:
    """The UTF-8 text of a file given on the command line; a missing or undecodable one is one line."""
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except OSError as exc:
        raise InvalidValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InvalidValueError(f"{flag} {path}: not UTF-8 text (byte {exc.start})") from None


def read_examples(
    path: Path, flag: str, error: Callable[[str], Exception] = InvalidValueError
) -> list[dict[str, Any]]:
    """Training rows from a JSON-lines file, a Parquet / CSV / Arrow file, a saved ``datasets``
    folder or a dataset name (:func:`lorafuse._data.read_rows`); a bad JSON line raises ``error``
    naming the flag, the file and the line (:func:`lorafuse._data.read_jsonl`)."""
    from lorafuse._data import read_jsonl, read_rows

    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return read_jsonl(path, where=f"{flag} {path}", error=error)
    return read_rows(path)


def _data_callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """A data file or folder that exists, or a dataset name (``org/name``, no file suffix)."""
    if value is None or ctx.resilient_parsing:
        return value
    for path in _paths(value):
        if path.exists() or (not path.suffix and not str(path).startswith((".", "/", "~"))):
            continue
        raise InvalidValueError(f"{flag_of(param)} {path}: no such file")
    return value


DATA: Callback = _data_callback
"""Training data: an existing file or folder, or a dataset name for ``datasets.load_dataset``."""


def _dtype_callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    return check_dtype(value, flag_of(param))


def _device_callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    return check_device(value, flag_of(param))


DTYPE: Callback = _dtype_callback
DEVICE: Callback = _device_callback


# Options several training verbs share (fuse, train-lora, route train, route train-encoder).
ROWS_HELP = (
    'JSON lines of {"messages"}, {"prompt", "completion"} or {"text"}; a Parquet/CSV/Arrow file; '
    "a saved datasets folder; or a dataset name."
)
CHAT_HELP = (
    'Render {"prompt", "completion"} rows with the chat template (a user and an assistant turn); '
    '{"messages"} rows always are, with the loss on assistant turns only.'
)
GradientCheckpointing = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing",
        help="Recompute the frozen base's activations in the backward pass (less memory, ~30% slower).",
    ),
]


def check_out(out: Path, inputs: OutputInputs, *, force: bool, flag: str = "--out") -> None:
    """Check an output before any work: never an input, nor inside or around one (``--force`` or
    not; an ``OutputPathError``: one line, status 2), leftovers of an interrupted write repaired,
    and an existing output only replaced with ``--force``."""
    from lorafuse._io import check_output_path, recover_leftovers

    check_output_path(out, inputs, what=flag)
    recover_leftovers(out)
    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder")


# Choices that come from the skill world, imported only when a command checks them.
def world_profiles() -> list[str]:
    """The skill world's profiles (``default``, ``tiny``)."""
    from lorafuse.skillworld import PROFILES

    return sorted(PROFILES)


def world_composites() -> list[str]:
    """Every composite task of the skill world (both variants)."""
    from lorafuse.skillworld.data import ALL_COMPOSITES

    return list(ALL_COMPOSITES)


def world_tasks() -> list[str]:
    """Every task with data in a skill world (skills, pool tasks, composites)."""
    from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS

    return [*SKILLS, *POOL, *COMPOSITES]
