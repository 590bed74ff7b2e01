"""The LoRA bank runtime: one bank module per adapted layer, fed per-rank coefficients by one source
protocol; an attached stack and a serving pool are two ways of filling it."""

from lorafuse.runtime.attach import AttachedBank, attach, attached_banks, detach
from lorafuse.runtime.bank import (
    Coefficients,
    CoefficientSource,
    LoRABank,
    PerLoRAWeights,
    StaticWeights,
    WeightSource,
)
from lorafuse.runtime.layer_input import ForwardCall, LayerInputSource, Reads, WeightRule
from lorafuse.runtime.pool import AdapterPool, BatchPlan

__all__ = [
    "AdapterPool",
    "AttachedBank",
    "BatchPlan",
    "CoefficientSource",
    "Coefficients",
    "ForwardCall",
    "LayerInputSource",
    "LoRABank",
    "PerLoRAWeights",
    "Reads",
    "StaticWeights",
    "WeightRule",
    "WeightSource",
    "attach",
    "attached_banks",
    "detach",
]
