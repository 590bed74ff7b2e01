"""Learned composition of LoRAs: LoRA-Flow gates, task-level baselines, and the shared training loop.

The package is callable: ``lorafuse.fuse(model, tokenizer, loras, train_rows, ...)`` is
:func:`lorafuse.fuse.api.fuse`, while ``lorafuse.fuse.flow`` etc. stay importable modules.
"""

import sys
import types

from lorafuse.fuse.api import (
    FUSION_METHODS,
    FuseSettings,
    fit_fresh_lora,
    fit_on_bank,
    fuse,
    train_fresh_lora,
)
from lorafuse.fuse.cat_weights import CatWeights
from lorafuse.fuse.controls import random_like
from lorafuse.fuse.flow import LoRAFlow, flow_for
from lorafuse.fuse.fusion import Fusion, FusionFormatError, load_fusion, save_fusion
from lorafuse.fuse.gate import FlowGates, GateConfig, gate_weights
from lorafuse.fuse.loop import TrainConfig, TrainResult, train, train_loop

__all__ = [
    "FUSION_METHODS",
    "CatWeights",
    "FlowGates",
    "FuseSettings",
    "Fusion",
    "FusionFormatError",
    "GateConfig",
    "LoRAFlow",
    "TrainConfig",
    "TrainResult",
    "fit_fresh_lora",
    "fit_on_bank",
    "flow_for",
    "fuse",
    "gate_weights",
    "load_fusion",
    "random_like",
    "save_fusion",
    "train",
    "train_fresh_lora",
    "train_loop",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fuse(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
