"""Training-free merging of LoRAs into one adapter: one file per method, an explicit registry.

Importing this package registers every method in :data:`MERGE_METHODS`.
"""

from lorafuse.merge import cat, lego, linear, svd, ties  # noqa: F401  (registration)
from lorafuse.merge.api import merge
from lorafuse.merge.recipe import MergeRecipe, RecipeError, load_recipe
from lorafuse.merge.registry import MERGE_METHODS, MergeMethod, get_method

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "MergeRecipe",
    "RecipeError",
    "get_method",
    "load_recipe",
    "merge",
]
