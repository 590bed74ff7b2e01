"""Merge recipes: a validated YAML in the spirit of mergekit's.

.. code-block:: yaml

    merge_method: ties
    models:
      - adapter: adapters/math
        weight: 1.0
      - adapter: adapters/zh
        weight: 0.5
    rank: 16
    parameters: {density: 0.5, majority_sign_method: total, convention: peft}
    union: false
    seed: 0
    dtype: bfloat16        # optional; default the inputs' dtype
    out: merged/math-zh    # optional; --out overrides

Relative adapter paths are taken from the recipe file's folder. ``merge_method`` takes the
canonical names (``dare-ties``) and the underscore spellings of older recipes (``dare_ties``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lorafuse._checks import MAX_MAGNITUDE, PositiveInt, StrictBool, describe_validation_error, parse_model
from lorafuse.errors import LorafuseError
from lorafuse.merging.registry import get_method

MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is a few lines; anything larger is not one


def _weight(value: Any) -> float:
    """A finite YAML number within ±1e6, also when PyYAML reads ``1e-3`` (no dot) as text."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if abs(number) > MAX_MAGNITUDE:
        raise ValueError(f"must lie within ±{MAX_MAGNITUDE:g}")
    return number


Weight = Annotated[float, BeforeValidator(_weight)]
AdapterPath = Annotated[str, StringConstraints(strict=True, min_length=1, pattern=r"^[^\x00]*$")]


class RecipeModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    adapter: AdapterPath
    weight: Weight = 1.0


def _first_non_finite(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            found = _first_non_finite(v, f"{where}.{k}")
            if found:
                return found
    return None


class MergeRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    merge_method: Annotated[str, StringConstraints(strict=True)]
    models: list[RecipeModel] = Field(min_length=1)
    rank: PositiveInt | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    union: StrictBool = False
    allow_different_bases: StrictBool = False
    seed: Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)] = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out: Annotated[str, StringConstraints(strict=True, min_length=1, pattern=r"^[^\x00]*$")] | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        return get_method(name).name  # raises on an unknown method; an old spelling becomes canonical

    @field_validator("parameters")
    @classmethod
    def _method_parameters(cls, parameters: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        bad = _first_non_finite(parameters, "")
        if bad:
            raise ValueError(f"{bad.lstrip('.')} must be a finite number")
        method = info.data.get("merge_method")
        if method is not None:
            try:
                get_method(method).params(**parameters)
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc)) from None
        return parameters


class RecipeError(LorafuseError, ValueError):
    """A recipe file that cannot be read or does not validate."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases: a recipe never needs them, and nested aliases can
    expand a few bytes into billions of entries."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a recipe", event.start_mark
            )
        return super().compose_node(parent, index)


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe:
    """Read and validate a recipe; adapter paths become absolute (relative to the file).

    Every problem is one :class:`RecipeError` naming the file and the field: unreadable, not
    UTF-8, too large or deeply nested YAML, aliases, not a mapping, unknown fields, weights that
    are NaN, infinite, beyond ±1e6 or text, a rank that is not a whole number ≥ 1, a dtype that is
    not a float type, bad method parameters.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {len(raw)} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader without aliases
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply to be a recipe") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with merge_method and models")
    recipe = parse_model(MergeRecipe, data, str(path), error=RecipeError)
    models = [
        RecipeModel(adapter=str((path.parent / m.adapter).resolve()), weight=m.weight) for m in recipe.models
    ]
    return recipe.model_copy(update={"models": models})
