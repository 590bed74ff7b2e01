"""One validation layer for numbers and on-disk JSON, used at every boundary (files, CLI, HTTP).

Every value that crosses into lorafuse from a user (a config field, a CLI flag, a request body) is
checked here before it reaches a tensor: finite, of the right type (``True`` is not a number,
``4.5`` is not a rank, ``"false"`` is not a boolean), inside its range. A failure raises
:class:`InvalidValueError` whose message names where the value came from (a file and field, a
flag) and the value itself, in one line.

Two entry points:

- :func:`check_number` for one value (``check_number(x, "--lr", low=0, low_open=True)``);
- :func:`parse_model` for a whole JSON object against a frozen pydantic model, turning
  pydantic's multi-line ``ValidationError`` into one line naming the file, field and value.

The pydantic field types below (``PositiveInt``, ``StrictFiniteFloat``, ``StrictPositiveFloat``,
...) are strict where JSON is ambiguous: a float field accepts an int but not ``true`` or ``"8"``,
an int field refuses ``4.5`` and ``true``, a bool field refuses strings and numbers.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints, ValidationError

from lorafuse.errors import LorafuseError

__all__ = [
    "InvalidValueError",
    "NonNegativeInt",
    "PositiveInt",
    "Sha256Hex",
    "StrictBool",
    "StrictFiniteFloat",
    "StrictPositiveFloat",
    "check_number",
    "describe_validation_error",
    "finite_or_none",
    "parse_model",
]

# Largest magnitude accepted for a float that scales a tensor: larger values overflow fp16/bf16
# products (and 1e308 * anything overflows fp32) into inf.
MAX_MAGNITUDE = 1e6


class InvalidValueError(LorafuseError, ValueError):
    """A number, flag or field outside what lorafuse accepts (NaN, inf, wrong type, out of range)."""


PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
# For values read from files: JSON numbers only (``true`` and ``"8"`` are refused, ints accepted).
StrictFiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
StrictPositiveFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_MAGNITUDE)]
Sha256Hex = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]

M = TypeVar("M", bound=BaseModel)


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bound(limit: float) -> str:
    """A range limit as written in messages: integers in full (``4294967295``), floats short."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def check_number(
    value: object,
    what: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite number within ``[low, high]`` (open ends with ``*_open``), or raise.

    ``what`` names the value for the message (``"--lr"``, ``"adapter_config.json: lora_alpha"``).
    Booleans are refused; with ``integer=True`` so are non-integral floats (``4.0`` is accepted and
    returned as ``4``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{what} must be a number, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValueError(f"{what} must be a finite number, got {value}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidValueError(f"{what} must be a whole number, got {value}")
        value = int(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '≥'} {_bound(low)}"
        hi = "" if high is None else f"{'<' if high_open else '≤'} {_bound(high)}"
        rule = " and ".join(part for part in (lo, hi) if part)
        raise InvalidValueError(f"{what} must be {rule}, got {_shown(value)}")
    return value


def describe_validation_error(exc: ValidationError) -> str:
    """One line for a pydantic error: ``field: message (got value)``, then how many more."""
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc)
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "value"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    got = first.get("input")
    text = f"{loc}: {message}"
    if first.get("type") not in ("missing",) and not isinstance(got, dict | list):
        text += f" (got {_shown(got)})"
    if len(errors) > 1:
        text += f"; and {len(errors) - 1} more problem(s)"
    return text


def parse_model(model: type[M], data: Any, where: str, error: type[LorafuseError] = InvalidValueError) -> M:
    """Validate ``data`` against ``model``; on failure raise ``error`` naming ``where`` and the field."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{where}: {describe_validation_error(exc)}") from None
    except (ValueError, TypeError) as exc:
        raise error(f"{where}: {exc}") from None


def finite_or_none(data: Any) -> Any:
    """A copy of JSON-ready ``data`` with every NaN/inf float replaced by ``None``.

    For records written beside outputs (training losses that diverged, ...): JSON has no NaN, and
    a record must never make its own folder unreadable.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_or_none(v) for v in data]
    return data
