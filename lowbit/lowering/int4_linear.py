"""W4A8 linears on the CPU with 4-bit weights kept at half a byte per value (``csrc/int4_linear.cpp``).

oneDNN's int8 GEMM takes int8 weights only, so a 4-bit weight handed to it would live in memory a
second time at a byte per value. This kernel reads the weight packed: per block of 64 output
channels it unpacks the block to int8 in cache and runs the products on ATen's u8 x s8 brgemm (AMX
or AVX512-VNNI). It reads the weight in the brgemm's order, a copy made once per weight (a cache
keyed by the tensor and its version, like oneDNN's prepacked weights), also packed two per byte.
It trades speed for memory: its GEMMs took about twice the time of oneDNN's prepacked ones on the PixArt
block (README, ``bench/compile_cpu.py --profile``).

The input's uint8 codes (a signed grid shifted into [0, 255] with its zero point) are computed in the
graph, with one scale per tensor or per row, so that inductor fuses them with what comes before. As
with oneDNN's calls, a linear -> GELU -> linear chain runs with GELU and the next layer's quantizer in
the kernel's epilogue, which writes that layer's codes (``int4_chained``; chosen in ``cpu.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.ir.packed_weights import PACKED_DTYPE, integer_codes
from lowbit.ir.schema import QuantizedLinear
from lowbit.lowering.native import has_int8_brgemm
from lowbit.lowering.translate import node_dtype, node_shape

__all__ = ["int4_chained", "int4_linear", "int4_linear_takes", "int4_matmul"]

_CHANNELS = 64  # output channels per block: csrc/int4_linear.cpp's kChannels
_LEVELS = 256


@dataclass(frozen=True)
class _KernelWeight:
    """One packed weight as the kernel reads it: blocks [ceil(N / 64), K / 4, 64, 2] and per-channel sums."""

    version: int
    blocks: Tensor
    sums: Tensor


_KERNEL_WEIGHTS: "WeakIdKeyDictionary[Tensor, _KernelWeight]" = WeakIdKeyDictionary()


def _kernel_weight(weight: Tensor) -> _KernelWeight:
    cached = _KERNEL_WEIGHTS.get(weight)
    if cached is None or cached.version != weight._version:
        n, k = weight.shape[0], 2 * weight.shape[1]
        padded = -(-n // _CHANNELS) * _CHANNELS
        groups = F.pad(weight.reshape(n, k // 4, 2), (0, 0, 0, 0, 0, padded - n))  # 4 input channels = 2 bytes
        blocks = groups.reshape(padded // _CHANNELS, _CHANNELS, k // 4, 2).permute(0, 2, 1, 3).contiguous()
        sums = integer_codes(weight).sum(1, dtype=torch.int32)
        cached = _KERNEL_WEIGHTS[weight] = _KernelWeight(weight._version, blocks, sums)
    return cached


_GELU_KINDS = {None: 0, "none": 1, "tanh": 2}  # csrc/int4_linear.cpp's Gelu; "none" is aten.gelu's exact (erf) form


@torch.library.custom_op("lowbit_cpu::int4_matmul", mutates_args=())
def int4_matmul(codes: Tensor, scale: Tensor, zero_point: Tensor, weight: Tensor, weight_scale: Tensor,
                bias: Tensor | None, gelu: str | None = None, output_scale: Tensor | None = None,
                output_zero_point: Tensor | None = None, output_grid: list[int] | None = None) -> Tensor:
    """y = scale (codes - zero_point) @ (weight_scale weight)ᵀ + bias, float32 [M, N]: uint8 codes [M, K] with
    one scale and zero point per row [M], a packed 4-bit weight [N, K / 2] with one scale per channel. ``gelu``
    ("none": exact, or "tanh") applies GELU to y; with ``output_scale`` the result is the next layer's uint8
    codes clamp(round(y / s) + z, qmin, qmax) - qmin on ``output_grid`` = (qmin, qmax)."""
    kernel_weight = _kernel_weight(weight)
    out_scale = None if output_scale is None else float(output_scale)
    out_zero = 0.0 if output_zero_point is None else float(output_zero_point)
    return torch.ops.lowbit_native.int4_linear(codes.contiguous(), kernel_weight.blocks, weight_scale.float().reshape(-1).contiguous(),
                                               kernel_weight.sums, scale.float().contiguous(), zero_point.float().contiguous(),
                                               bias, weight.shape[0], _GELU_KINDS[gelu], out_scale, out_zero,
                                               *(output_grid or (0, 255)))


@int4_matmul.register_fake
def _(codes, scale, zero_point, weight, weight_scale, bias, gelu=None, output_scale=None, output_zero_point=None,
      output_grid=None):
    return codes.new_empty((codes.shape[0], weight.shape[0]), dtype=torch.float32 if output_scale is None else torch.uint8)


def _rows(x: Tensor, input_scale: Tensor, input_zero_point: Tensor | None, qmin: int, qmax: int,
          codes_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(uint8 codes [M, K], scale [M], zero point [M]) of a linear's input, relative to qmin; computed in the graph,
    or, with ``codes_input``, the codes the linear before wrote."""
    row_shape = (*x.shape[:-1], 1)
    scale = input_scale.float().expand(row_shape).reshape(-1, 1)
    zero_point = torch.zeros_like(scale) if input_zero_point is None else input_zero_point.float().expand(row_shape).reshape(-1, 1)
    rows = x.reshape(-1, x.shape[-1])
    codes = rows if codes_input else (torch.clamp(torch.round(rows.float() / scale) + zero_point, qmin, qmax) - qmin).to(torch.uint8)
    return codes, scale.reshape(-1), (zero_point - qmin).reshape(-1)


def int4_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                input_zero_point: Tensor | None, input_qmin: int, input_qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` of a packed 4-bit weight: the input's uint8 codes computed in the graph (where
    inductor fuses them into one pass, as for oneDNN's calls), the GEMM on the int4 kernel."""
    codes, scale, zero_point = _rows(x, input_scale, input_zero_point, input_qmin, input_qmax, False)
    y = int4_matmul(codes, scale, zero_point, weight, weight_scale, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def int4_chained(dtype: torch.dtype, codes_input: bool, gelu: str | None = None) -> Callable:
    """An int4 linear computing ``dtype`` whose input arrives as codes (``codes_input``) and/or which applies
    GELU and writes the next linear's input codes (``gelu``: that GELU's ``approximate``)."""

    def run(*, output_scale: Tensor | None = None, output_zero_point: Tensor | None = None,
            output_grid: tuple[int, int] | None = None, **arguments) -> Tensor:
        op = QuantizedLinear(**arguments)
        codes, scale, zero_point = _rows(op.x, op.input_scale, op.input_zero_point, op.input_qmin, op.input_qmax, codes_input)
        y = int4_matmul(codes, scale, zero_point, op.weight, op.weight_scale, op.bias, gelu, output_scale, output_zero_point,
                        None if output_grid is None else list(output_grid))
        y = y.reshape(*op.x.shape[:-1], op.weight.shape[0])
        return y if gelu is not None else y.to(dtype)

    return run


def int4_linear_takes(node: torch.fx.Node) -> bool:
    """Whether a ``quantized_linear`` node runs on the int4 kernel: a packed weight, an input quantized on at
    most 256 levels with one scale per tensor or per row, K a multiple of 4, and a host the kernel runs on."""
    op = QuantizedLinear.of(node)
    weight_shape, scale_shape = node_shape(op.weight), node_shape(op.input_scale)
    if node_dtype(op.weight) != PACKED_DTYPE or op.input_scale is None or op.input_levels > _LEVELS:
        return False
    one_per_row = scale_shape is not None and (not scale_shape or scale_shape[-1] == 1)
    return one_per_row and weight_shape is not None and (2 * weight_shape[1]) % 4 == 0 and has_int8_brgemm()
