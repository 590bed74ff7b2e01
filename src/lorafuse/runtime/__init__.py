"""The LoRA bank runtime: one module per adapted layer, weighted by static or dynamic sources."""

from lorafuse.runtime.attach import AttachedBank, attach, attached_banks, detach
from lorafuse.runtime.bank import LoRABank, StaticWeights, WeightSource
from lorafuse.runtime.pool import AdapterPool, BatchPlan

__all__ = [
    "AdapterPool",
    "AttachedBank",
    "BatchPlan",
    "LoRABank",
    "StaticWeights",
    "WeightSource",
    "attach",
    "attached_banks",
    "detach",
]
