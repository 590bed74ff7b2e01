"""Merge recipes: a validated YAML in the spirit of mergekit's.

.. code-block:: yaml

    merge_method: ties
    models:
      - adapter: adapters/math
        weight: 1.0
      - adapter: adapters/zh
        weight: 0.5
    rank: 16
    parameters: {density: 0.5, majority_sign_method: total}
    union: false
    seed: 0
    dtype: bfloat16        # optional; default the inputs' dtype
    out: merged/math-zh    # optional; --out overrides

Relative adapter paths are taken from the recipe file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorafuse.errors import LorafuseError
from lorafuse.merge.registry import get_method


class RecipeModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    adapter: str
    weight: float = 1.0


class MergeRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    merge_method: str
    models: list[RecipeModel] = Field(min_length=1)
    rank: int | None = Field(None, ge=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    union: bool = False
    allow_different_bases: bool = False
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out: str | None = None

    @model_validator(mode="after")
    def _method_and_parameters(self) -> MergeRecipe:
        get_method(self.merge_method).params(**self.parameters)  # raises on unknown or bad settings
        return self


class RecipeError(LorafuseError, ValueError):
    """A recipe file that cannot be read or does not validate."""


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe:
    """Read and validate a recipe; adapter paths become absolute (relative to the file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with merge_method and models")
    try:
        recipe = MergeRecipe(**data)
    except (ValidationError, ValueError) as exc:
        raise RecipeError(f"{path}: invalid recipe: {exc}") from None
    models = [
        RecipeModel(adapter=str((path.parent / m.adapter).resolve()), weight=m.weight) for m in recipe.models
    ]
    return recipe.model_copy(update={"models": models})
