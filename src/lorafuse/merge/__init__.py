"""Training-free merging of LoRAs into one adapter: one file per method, an explicit registry.

Importing this package registers every method in :data:`MERGE_METHODS`. The package itself is
callable, so that ``lorafuse.merge(loras, method, ...)`` is :func:`lorafuse.merge.api.merge`
while ``lorafuse.merge.ties`` etc. stay importable modules.
"""

import sys
import types

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


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
