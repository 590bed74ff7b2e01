"""Adapters: LoRA factors and dense deltas in memory, PEFT-format I/O, validation."""

from lorafuse.adapters.lora import Delta, LoRA, LoRAModule, module_kind
from lorafuse.adapters.peft_format import load_lora, save_lora
from lorafuse.adapters.validate import check_compatible

__all__ = [
    "Delta",
    "LoRA",
    "LoRAModule",
    "check_compatible",
    "load_lora",
    "module_kind",
    "save_lora",
]
