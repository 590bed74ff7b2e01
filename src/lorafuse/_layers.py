"""Finding the decoder layers of a HuggingFace causal LM (shared by every layer-wise tool)."""

from __future__ import annotations

from torch import nn

from lorafuse.errors import LorafuseError

LAYER_LIST_NAMES = frozenset({"layers", "h", "blocks"})


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
