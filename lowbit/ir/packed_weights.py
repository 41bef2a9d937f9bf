"""4-bit integer weights stored two per byte: the form every target keeps them in memory.

A weight of at most 4 bits whose input-channel axis (dim 1: a linear's K, a convolution's C_in per
group) has even length is stored as uint8 with that axis halved: byte j holds channel 2j in its low
nibble and channel 2j + 1 in its high nibble, two's complement (the layout the Triton int4 kernel
and the CPU kernel read). The dtype says which form a tensor is in: uint8 is packed, int8 and int16
are codes as they are. An odd axis stays int8 (no real layer here has one; padding it would make the
packed tensor's shape ambiguous).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PACKED_DTYPE", "packable", "pack_int4", "unpack_int4", "integer_codes", "unpacked_shape"]

PACKED_DTYPE = torch.uint8


def packable(bits: float, shape: tuple[int, ...]) -> bool:
    """Whether a weight of ``bits`` and ``shape`` is stored packed."""
    return bits <= 4 and len(shape) >= 2 and shape[1] % 2 == 0


def pack_int4(codes: Tensor) -> Tensor:
    """Integer codes in [-8, 7] (dim 1 even) -> uint8 with dim 1 halved, two codes per byte."""
    if codes.dim() < 2 or codes.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even input-channel axis (dim 1); got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("int4 weights must lie in [-8, 7]")
    c = codes.to(torch.int16)
    return ((c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)).to(PACKED_DTYPE).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of ``pack_int4``: uint8 -> int8 codes with dim 1 doubled."""
    p = packed.to(torch.int16)
    nibble = lambda n: ((n ^ 8) - 8).to(torch.int8)  # noqa: E731  (sign-extends a 4-bit two's complement value)
    both = torch.stack([nibble(p & 0xF), nibble(p >> 4)], dim=2)  # (d0, d1/2, 2, ...)
    return both.reshape(packed.shape[0], 2 * packed.shape[1], *packed.shape[2:])


def integer_codes(weight: Tensor) -> Tensor:
    """A stored integer weight as its codes, unpacked if packed."""
    return unpack_int4(weight) if weight.dtype == PACKED_DTYPE else weight


def unpacked_shape(weight: Tensor) -> tuple[int, ...]:
    """The shape of a stored integer weight's codes."""
    shape = tuple(weight.shape)
    return (shape[0], 2 * shape[1], *shape[2:]) if weight.dtype == PACKED_DTYPE else shape
