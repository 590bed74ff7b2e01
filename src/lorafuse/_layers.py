"""Finding the decoder layers of a HuggingFace causal LM (shared by every layer-wise tool)."""

from __future__ import annotations

import re

from torch import nn

from lorafuse.errors import LorafuseError

LAYER_LIST_NAMES = frozenset({"layers", "h", "blocks"})
_INDEX_RE = re.compile(r"\.(\d+)\.")


def layer_index(path: str, prefix: str | None = None) -> int | None:
    """The decoder-layer index in a module path (``model.layers.3.mlp.up_proj`` → 3), or ``None``.

    With ``prefix`` (the decoder-layer list's qualified name) only paths inside that list count;
    without it, the first number between dots.
    """
    if prefix is not None:
        head = f"{prefix}."
        if not path.startswith(head):
            return None
        number = path[len(head) :].split(".", 1)[0]
        return int(number) if number.isdigit() else None
    match = _INDEX_RE.search(f".{path}.")
    return int(match.group(1)) if match else None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder layers (``model.layers``, ``transformer.h``, ...).

    The list is the ``ModuleList`` named ``layers`` / ``h`` / ``blocks`` whose length is
    ``config.num_hidden_layers`` (any length when the config does not say).
    """
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is None and config is not None and hasattr(config, "get_text_config"):
        count = getattr(config.get_text_config(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and (count is None or len(module) == count)
            and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES
        ):
            return name, module
    raise LorafuseError(
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList named 'layers' or "
        f"'h' with config.num_hidden_layers={count} entries)"
    )
