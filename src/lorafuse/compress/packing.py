"""Bit-packing of integer codes (1–8 bits each) into bytes, and its exact size.

Codes are laid out as one little-endian bit stream: code ``i`` occupies bits
``[i·b, (i+1)·b)`` of the stream, bit ``k`` of the stream is bit ``k mod 8`` of byte ``⌊k/8⌋``.
``n`` codes of ``b`` bits take exactly ``⌈n·b / 8⌉`` bytes, so a packed tensor's ``nbytes`` is
what it costs on disk. Pure tensor maths.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits: ``⌈n·bits/8⌉``."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2^bits)``) into a flat ``uint8`` tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)  # (n,)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)  # (b,)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # (n·b,)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)  # (8,)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a flat ``uint8`` tensor."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"packed tensor holds {packed.numel()} bytes, expected {packed_nbytes(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.reshape(-1).clone()
    data = packed.reshape(-1).to(torch.int32)
    stream = ((data[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32)  # (b,)
    return (stream.reshape(n, bits) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
