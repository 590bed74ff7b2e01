"""Open any artefact folder lorafuse writes by the kind its header names: :func:`load`.

==========================  =====================  ==========================================
kind (header ``format``)    header file            opened as
==========================  =====================  ==========================================
``lorafuse-lora``           adapter_model (meta)   :class:`~lorafuse.adapters.LoRA`
``lorafuse-fusion``         fusion.json            :class:`~lorafuse.fusion.Fusion`
``lorafuse-mixture``        mixture.json           :class:`~lorafuse.route.Mixture` (``model``)
``lorafuse-instance-…``     encoder.json           :class:`~lorafuse.fusion.instance.InstanceMixing`
                                                   (``model``)
``lorafuse-compressed-…``   compressed.json        :class:`~lorafuse.compress.CompressedDelta`
==========================  =====================  ==========================================

A PEFT adapter folder written by any tool (no lorafuse header) opens as a LoRA. Mixtures and
instance encoders attach to a base model, so they need ``model``; every artefact class also has
``save(dir, *, overwrite=False)`` and ``load(dir, ...)`` of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lorafuse._artefact import read_header
from lorafuse.adapters import LoRA
from lorafuse.adapters.peft_format import LORA_FORMAT
from lorafuse.compress.format import COMPRESSED_FORMAT, CompressedDelta
from lorafuse.errors import ArtefactError
from lorafuse.fusion.artefact import FUSION_FORMAT, Fusion
from lorafuse.fusion.instance import ENCODER_FORMAT, InstanceMixing
from lorafuse.route.mixture import MIXTURE_FORMAT, Mixture

Artefact = LoRA | Fusion | Mixture | InstanceMixing | CompressedDelta


def _needs_model(kind: str, folder: Path, model: nn.Module | None) -> nn.Module:
    if model is None:
        raise ArtefactError(
            f"{folder}: a {kind} attaches to its base model; pass model= (the base loaded with "
            "AutoModelForCausalLM) to open it"
        )
    return model


LOADERS: dict[str, Callable[[Path, nn.Module | None], Artefact]] = {
    LORA_FORMAT.kind: lambda folder, model: LoRA.load(folder),
    FUSION_FORMAT.kind: lambda folder, model: Fusion.load(folder),
    COMPRESSED_FORMAT.kind: lambda folder, model: CompressedDelta.load(folder),
    MIXTURE_FORMAT.kind: lambda folder, model: Mixture.load(
        folder, _needs_model(MIXTURE_FORMAT.kind, folder, model)
    ),
    ENCODER_FORMAT.kind: lambda folder, model: InstanceMixing.load(
        folder, _needs_model(ENCODER_FORMAT.kind, folder, model)
    ),
}


def load(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> Artefact:
    """Open the artefact folder ``path`` as the class its header's kind names (see the table above).

    Errors are one :class:`~lorafuse.errors.ArtefactError` (or its format's subclass) naming the
    file and field: no header file, an unknown kind, a version newer than this lorafuse reads,
    a malformed field; or ``model`` missing for a kind that attaches to a base model.
    """
    folder = Path(path)
    header = read_header(folder)
    return LOADERS[header.kind](folder, model)
