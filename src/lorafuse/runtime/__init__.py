"""The LoRA bank runtime: one module per adapted layer, weighted by static or dynamic sources."""

from lorafuse.runtime.attach import AttachedBank, attach, attached_banks, detach
from lorafuse.runtime.bank import LoRABank, StaticWeights, WeightSource

__all__ = [
    "AttachedBank",
    "LoRABank",
    "StaticWeights",
    "WeightSource",
    "attach",
    "attached_banks",
    "detach",
]
