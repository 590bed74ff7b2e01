"""Compressing full fine-tuning deltas: Delta-CoMe, low-rank, BitDelta and RTN at one byte budget.

Importing this package registers every method in :data:`COMPRESS_METHODS`.
"""

from lorafuse.compress import bitdelta, deltacome, lowrank, rtn  # noqa: F401  (registration)
from lorafuse.compress.api import apply_delta, compress_checkpoint, decompress
from lorafuse.compress.budget import budget_nbytes, parse_budget, parse_schedule
from lorafuse.compress.calibrate import activation_error, collect_hessians
from lorafuse.compress.distill import distill_scales
from lorafuse.compress.format import CompressedDelta, load_compressed, save_compressed
from lorafuse.compress.packing import pack_bits, packed_nbytes, unpack_bits
from lorafuse.compress.quantize import QuantizedMatrix, gptq_quantize, gptq_quantize_segments, rtn_quantize
from lorafuse.compress.registry import COMPRESS_METHODS, CompressMethod, get_method

__all__ = [
    "COMPRESS_METHODS",
    "CompressMethod",
    "CompressedDelta",
    "QuantizedMatrix",
    "activation_error",
    "apply_delta",
    "budget_nbytes",
    "collect_hessians",
    "compress_checkpoint",
    "decompress",
    "distill_scales",
    "get_method",
    "gptq_quantize",
    "gptq_quantize_segments",
    "load_compressed",
    "pack_bits",
    "packed_nbytes",
    "parse_budget",
    "parse_schedule",
    "rtn_quantize",
    "save_compressed",
    "unpack_bits",
]
