"""Learned composition of LoRAs: LoRA-Flow gates and the task-level baselines.

Users call :func:`lorafuse.fuse` (this package's :func:`~lorafuse.fusion.api.fuse`); the training
loop every learned method shares is :mod:`lorafuse.train`.
"""

from lorafuse.fusion.api import (
    FUSION_METHODS,
    FuseSettings,
    fit_fresh_lora,
    fit_on_bank,
    fuse,
    train_fresh_lora,
)
from lorafuse.fusion.artefact import WEIGHTINGS, Fusion, FusionFormatError, load_fusion, save_fusion
from lorafuse.fusion.cat_weights import CatWeights
from lorafuse.fusion.controls import random_like
from lorafuse.fusion.flow import LoRAFlow, flow_for
from lorafuse.fusion.gate import FlowGates, GateConfig, gate_weights
from lorafuse.fusion.methods import FitRun, FusionMethod, LoRAFlowParams, LoraHubParams
from lorafuse.fusion.weighting import Weighting

__all__ = [
    "FUSION_METHODS",
    "WEIGHTINGS",
    "CatWeights",
    "FitRun",
    "FlowGates",
    "FuseSettings",
    "Fusion",
    "FusionFormatError",
    "FusionMethod",
    "GateConfig",
    "LoRAFlow",
    "LoRAFlowParams",
    "LoraHubParams",
    "Weighting",
    "fit_fresh_lora",
    "fit_on_bank",
    "flow_for",
    "fuse",
    "gate_weights",
    "load_fusion",
    "random_like",
    "save_fusion",
    "train_fresh_lora",
]
