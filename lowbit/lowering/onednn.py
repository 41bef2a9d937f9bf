"""int8 GEMMs and convolutions on oneDNN's prepacked weights: the CPU target's VNNI / AMX kernels
(bench/gemm_cpu.py).

oneDNN wants an int8 weight reordered into the blocked layout of the host's kernel; ``torch._int_mm``
redoes that on every call, these ops once per weight tensor (a cache keyed by the tensor and its
version). Where PyTorch was built without oneDNN, ``int8_matmul`` falls back to ``torch._int_mm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.ir.packed_weights import integer_codes

__all__ = ["int8_matmul", "quantized_conv2d", "quantized_matmul"]

_PACKED: "WeakIdKeyDictionary[Tensor, _Packed]" = WeakIdKeyDictionary()


@dataclass(frozen=True)
class _Packed:
    """What oneDNN's calls take for one int8 weight, made once per weight version: its blocked copy, and
    a zero point (0) and a unit scale per output channel."""

    version: int
    weight: Tensor
    zero_points: Tensor
    unit_scales: Tensor


def _packed(weight: Tensor, pack=lambda w: torch.ops.onednn.qlinear_prepack(w, None)) -> _Packed:
    """oneDNN's packed form of an integer weight (``pack``: a linear's [N, K] by default). A 4-bit weight stored two
    per byte is unpacked for it: oneDNN's copy then holds a byte per value."""
    packed = _PACKED.get(weight)
    if packed is None or packed.version != weight._version:
        rows = weight.shape[0]
        packed = _PACKED[weight] = _Packed(weight._version, pack(integer_codes(weight)), torch.zeros(rows, dtype=torch.long),
                                           torch.ones(rows))
    return packed


def _qlinear(codes: Tensor, scale: Tensor, zero_point: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
             gelu: str | None = None, output_scale: float = 1.0, output_zero_point: int = 0,
             output_dtype: torch.dtype = torch.float32) -> Tensor:
    packed = _packed(weight)
    post_op, algorithm = ("gelu", gelu) if gelu is not None else ("none", "")
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, scale.float().reshape(()), zero_point.long().reshape(()), packed.weight, weight_scale.float().reshape(-1),
        packed.zero_points, bias, output_scale, output_zero_point, output_dtype, post_op, [None], algorithm)


@torch.library.custom_op("lowbit_cpu::int8_matmul", mutates_args=())
def int8_matmul(codes: Tensor, weight: Tensor) -> Tensor:
    """sum_k codes[m, k] * weight[n, k] of int8 codes [M, K] and an int8 weight [N, K], as float32."""
    if not torch.backends.mkldnn.is_available():
        return torch._int_mm(codes, integer_codes(weight).t()).float()
    return _qlinear(codes, torch.ones(()), torch.zeros(()), weight, _packed(weight).unit_scales, None)


@int8_matmul.register_fake
def _(codes: Tensor, weight: Tensor) -> Tensor:
    return codes.new_empty((codes.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lowbit_cpu::quantized_matmul", mutates_args=())
def quantized_matmul(codes: Tensor, scale: Tensor, zero_point: Tensor, weight: Tensor, weight_scale: Tensor,
                     bias: Tensor | None, gelu: str | None = None, output_scale: Tensor | None = None,
                     output_zero_point: Tensor | None = None, output_dtype: torch.dtype | None = None) -> Tensor:
    """y = scale (codes - zero_point) @ (weight_scale weight)ᵀ + bias in one oneDNN call, its zero point's
    correction included (the weight sums are part of the packed weight): codes (..., K) uint8 or int8
    with one scale and zero point, the int8 weight [N, K] one scale per row. ``gelu`` ("none" or
    "tanh") applies GELU to y in the GEMM's epilogue; with ``output_dtype`` (uint8 or int8) the result is
    y's codes clamp(round(y / output_scale) + output_zero_point) on that type's whole range (the next
    layer's quantizer), else y in float32."""
    if output_dtype is None:
        return _qlinear(codes, scale, zero_point, weight, weight_scale, bias, gelu)
    return _qlinear(codes, scale, zero_point, weight, weight_scale, bias, gelu, float(output_scale), int(output_zero_point),
                    output_dtype)


@quantized_matmul.register_fake
def _(codes, scale, zero_point, weight, weight_scale, bias, gelu=None, output_scale=None, output_zero_point=None,
      output_dtype=None):
    return codes.new_empty((*codes.shape[:-1], weight.shape[0]), dtype=output_dtype or torch.float32)


@torch.library.custom_op("lowbit_cpu::quantized_conv2d", mutates_args=())
def quantized_conv2d(codes: Tensor, scale: Tensor, zero_point: Tensor, weight: Tensor, weight_scale: Tensor,
                     bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """conv2d(scale (codes - zero_point), weight_scale weight) + bias in float32 (channels-last, oneDNN's
    layout), one oneDNN call: codes (N, C, H, W) uint8 or int8 with one scale and zero point, the int8
    weight with one scale per output channel."""
    packed = _packed(weight, lambda w: torch.ops.onednn.qconv_prepack(w, weight_scale.float().reshape(-1), 1.0, 0, stride,
                                                                       padding, dilation, groups, None))
    out = torch.ops.onednn.qconv2d_pointwise.tensor(
        codes, scale.float().reshape(()), zero_point.long().reshape(()), packed.weight, weight_scale.float().reshape(-1),
        packed.zero_points, bias, stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    return out.contiguous(memory_format=torch.channels_last)


@quantized_conv2d.register_fake
def _(codes, scale, zero_point, weight, weight_scale, bias, stride, padding, dilation, groups):
    (h, w), (kh, kw) = codes.shape[-2:], weight.shape[-2:]
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip((h, w), padding, dilation, (kh, kw), stride)]
    return codes.new_empty((codes.shape[0], weight.shape[0], *size), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
