"""CPU target: quantized linears as int8 x int8 -> int32 GEMMs (``torch._int_mm``, VNNI here).

lowbit stores activations as asymmetric integers in [qmin, qmax] with a zero point z, weights as
symmetric int8 with one scale per output channel. Shifting the activation integers by
c = (qmin + qmax + 1) // 2 brings an 8-bit range into int8, and the zero point moves into the
epilogue, which inductor fuses with the quantizer prologue:

    y[m, n] = s_x[m] * s_w[n] * (sum_k (q[m, k] - c) w[n, k] - (z[m] - c) * sum_k w[n, k]) + b[n]

The integer sum is exact, so the result equals the reference ``quantized_linear`` up to float32
rounding of the final scale. Cases with no int8 form here run the reference arithmetic, and the
translation report names them: activations wider than 8 bits, and DGQ channel groups (a scale
that varies along the reduced dimension cannot leave the integer sum; the Triton target has a
group GEMM for those). Everything else (attention, convolutions, fake quantizers) is the
reference arithmetic, inlined for inductor to fuse.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch import Tensor

from lowbit.ir.ops import linear_reference

__all__ = ["CHANNEL_GROUPED", "CPU_TRANSLATIONS", "int8_linear", "int8_form"]

_INT8_LEVELS = 256
CHANNEL_GROUPED = "channel-grouped input scale (DGQ groups) varies along the reduced dimension"


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                input_zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` through ``torch._int_mm``; the input scale is per tensor or per row."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    row_shape = (*x.shape[:-1], 1)
    scale = input_scale.float().expand(row_shape).reshape(-1, 1)
    zero_point = torch.zeros_like(scale) if input_zero_point is None else input_zero_point.float().expand(row_shape).reshape(-1, 1)
    shift = (qmin + qmax + 1) // 2
    q = (torch.clamp(torch.round(rows / scale) + zero_point, qmin, qmax) - shift).to(torch.int8)
    acc = torch._int_mm(q, weight.t())
    weight_sums = weight.sum(1, dtype=torch.int32)
    y = (acc - (zero_point - shift).to(torch.int32) * weight_sums).float() * (scale * weight_scale.float())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def int8_form(node: torch.fx.Node) -> str | None:
    """None when a ``quantized_linear`` node has an int8 form, else why not."""
    _, weight, _, _, scale, _, qmin, qmax = node.args
    if scale is None:
        return "input not quantized"
    if qmax - qmin + 1 > _INT8_LEVELS:
        return f"{(qmax - qmin + 1).bit_length() - 1}-bit activations do not fit int8"
    weight_shape, scale_shape = _shape(weight), _shape(scale)
    if weight_shape is not None and scale_shape and scale_shape[-1] != 1 and scale_shape[-1] == weight_shape[1]:
        return CHANNEL_GROUPED
    return None


def _linear(node: torch.fx.Node) -> tuple[Callable, str | None]:
    reason = int8_form(node)
    return (linear_reference, reason) if reason else (int8_linear, None)


CPU_TRANSLATIONS = {torch.ops.lowbit.quantized_linear.default: _linear}
