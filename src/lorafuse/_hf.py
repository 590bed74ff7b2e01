"""The one place lorafuse loads a HuggingFace causal LM and a tokenizer from a folder.

Every verb (through :mod:`lorafuse.cli.loading`), the skill world and the studies load a base
model with :func:`load_model` and a tokenizer with :func:`load_tokenizer`, so a change to how
models are read (dtype, device, evaluation mode) is made once. Nothing here checks command-line
values or prints: callers name their flags in their own messages. Imports nothing of lorafuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["load_model", "load_model_shapes", "load_tokenizer"]


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    train: bool = False,
    **kwargs: Any,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` (float32 by default), moved to
    ``device`` when given, in evaluation mode unless ``train``; ``kwargs`` go to ``from_pretrained``
    (``gguf_file=...``)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs)
    if device is not None:
        model = model.to(device)
    return model if train else model.eval()


def load_model_shapes(path: str | Path) -> Any:
    """The model of ``path``'s ``config.json`` with its weights on the meta device: its layers and
    their shapes, no weights read (``OSError``/``ValueError`` when the config cannot be read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = str(path)
    return model


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)
