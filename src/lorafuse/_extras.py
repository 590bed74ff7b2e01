"""Optional packages: import one, or say which extra of lorafuse brings it.

``pip install lorafuse`` brings what merging, fusing and compressing need. Serving
(``lorafuse[serve]``: FastAPI, uvicorn, prometheus-client) and the plots, the LoraHub search
and the studies (``lorafuse[study]``: matplotlib, nevergrad) are extras; their imports go
through :func:`require` inside the functions that need them, so ``import lorafuse`` works
without them and a missing one is one clear error (one line and exit status 2 on the command
line) instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lorafuse.errors import LorafuseError

# How each optional package is called in messages (its import name otherwise).
DISPLAY_NAMES = {
    "fastapi": "FastAPI",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
    "starlette": "Starlette",
    "matplotlib": "matplotlib",
    "nevergrad": "nevergrad",
    "sklearn": "scikit-learn",
    "mkdocs": "MkDocs",
}


class MissingExtraError(LorafuseError, ImportError):
    """An optional package that a feature needs is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    ``require("fastapi", "serve", "lorafuse serve")`` returns the ``fastapi`` module, or raises
    ``lorafuse serve needs FastAPI: pip install 'lorafuse[serve]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        name = DISPLAY_NAMES.get(top, top)
        raise MissingExtraError(f"{feature} needs {name}: pip install 'lorafuse[{extra}]'") from exc
