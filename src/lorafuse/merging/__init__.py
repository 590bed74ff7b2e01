"""Training-free merging of LoRAs into one adapter: one file per method, an explicit registry.

Importing this package registers every method in :data:`MERGE_METHODS`; users call
:func:`lorafuse.merge` (this package's :func:`~lorafuse.merging.api.merge`).
"""

from lorafuse.merging import cat, lego, linear, svd, ties  # noqa: F401  (registration)
from lorafuse.merging.api import merge
from lorafuse.merging.recipe import MergeRecipe, RecipeError, load_recipe
from lorafuse.merging.registry import MERGE_METHODS, MergeMethod, get_method

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "MergeRecipe",
    "RecipeError",
    "get_method",
    "load_recipe",
    "merge",
]
