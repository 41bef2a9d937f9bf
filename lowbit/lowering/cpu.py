"""CPU target: quantized linears as int8 x int8 -> int32 GEMMs (``torch._int_mm``, fast only where the
host has VNNI or AMX: see bench/gemm_cpu.py).

lowbit stores activations as asymmetric integers in [qmin, qmax] with a zero point z, weights as
symmetric int8 with one scale per output channel. Shifting the activation integers by
c = (qmin + qmax + 1) // 2 brings an 8-bit range into int8, and the zero point moves into the
epilogue, which inductor fuses with the quantizer prologue:

    y[m, n] = s_x[m] * s_w[n] * (sum_k (q[m, k] - c) w[n, k] - (z[m] - c) * sum_k w[n, k]) + b[n]

The integer sum is exact, so the result equals the reference ``quantized_linear`` up to float32
rounding of the final scale. DGQ's channel groups give each input channel its own (scale, zero
point), G distinct pairs: the channels are reordered group by group once per grouping, and each
group's integer partial sum gets its own parameters (``group_linear``). Activations wider than
8 bits have no int8 form and run the reference arithmetic; the translation report names them.
Windowed attention (MDWA) runs FlexAttention's block-sparse kernel with small tiles
(:mod:`lowbit.lowering.windowed_attention`). Everything else (other attention, convolutions, fake
quantizers) is the reference arithmetic, inlined for inductor to fuse.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.fx
from torch import Tensor

from lowbit.ir.ops import attention_reference, linear_reference
from lowbit.ir.schema import QuantizedAttention, QuantizedLinear
from lowbit.lowering.windowed_attention import CPU_TILE, windowed_attention_form

__all__ = ["CHANNEL_GROUPED", "CPU_TRANSLATIONS", "channel_groups", "group_linear", "int8_form", "int8_linear"]

_INT8_LEVELS = 256
CHANNEL_GROUPED = "channel-grouped input scale (DGQ groups) varies along the reduced dimension"


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                input_zero_point: Tensor | None, input_qmin: int, input_qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` through ``torch._int_mm``; the input scale is per tensor or per row."""
    qmin, qmax = input_qmin, input_qmax
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


def channel_groups(input_scale: Tensor, input_zero_point: Tensor) -> tuple[Tensor, Tensor]:
    """DGQ's per-channel parameters as G distinct (scale, zero point) rows [G, 2] and each
    channel's group label [K]."""
    pairs = torch.stack([input_scale.float().reshape(-1), input_zero_point.float().reshape(-1)], 1)
    return torch.unique(pairs, dim=0, return_inverse=True)


_LAYOUTS: "weakref.WeakKeyDictionary[Tensor, dict[bytes, tuple]]" = weakref.WeakKeyDictionary()


def _group_layout(weight: Tensor, labels: Tensor, groups: int) -> tuple[Tensor, Tensor, list[int], Tensor]:
    """Channel order (group by group), the reordered weight, group boundaries, per-group weight sums."""
    layouts = _LAYOUTS.setdefault(weight, {})
    key = labels.to(torch.int16).numpy().tobytes()
    if key not in layouts:
        order = torch.sort(labels, stable=True).indices
        bounds = [0, *torch.bincount(labels, minlength=groups).cumsum(0).tolist()]
        reordered = weight[:, order].contiguous()
        sums = torch.stack([reordered[:, a:b].sum(1, dtype=torch.int32) for a, b in zip(bounds, bounds[1:])])
        layouts[key] = (order, reordered, bounds, sums)
    return layouts[key]


def _group_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                  input_zero_point: Tensor, input_qmin: int, input_qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` with DGQ channel groups: one int8 GEMM per group, summed."""
    qmin, qmax = input_qmin, input_qmax
    groups, labels = channel_groups(input_scale, input_zero_point)
    order, reordered, bounds, sums = _group_layout(weight, labels, groups.shape[0])
    rows = x.reshape(-1, x.shape[-1]).float()[:, order]
    shift = (qmin + qmax + 1) // 2
    y = torch.zeros(rows.shape[0], weight.shape[0])
    for g, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a == b:
            continue
        scale, zero_point = groups[g, 0], groups[g, 1]
        q = (torch.clamp(torch.round(rows[:, a:b] / scale) + zero_point, qmin, qmax) - shift).to(torch.int8)
        acc = torch._int_mm(q, reordered[:, a:b].t()) - (int(zero_point) - shift) * sums[g]
        y += scale * acc.float()
    y = y * weight_scale.float()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


group_linear = QuantizedLinear.define("lowbit_cpu::group_linear", _group_linear)


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def int8_form(node: torch.fx.Node) -> str | None:
    """None when a ``quantized_linear`` node has an int8 form, else why not."""
    op = QuantizedLinear.of(node)
    if op.input_scale is None:
        return "input not quantized"
    if op.input_levels > _INT8_LEVELS:
        return f"{op.input_levels.bit_length() - 1}-bit activations do not fit int8"
    weight_shape, scale_shape = _shape(op.weight), _shape(op.input_scale)
    if weight_shape is not None and scale_shape and scale_shape[-1] != 1 and scale_shape[-1] == weight_shape[1]:
        return CHANNEL_GROUPED if op.input_zero_point is not None else "channel-grouped input without zero points"
    return None


def _linear(node: torch.fx.Node) -> tuple[Callable, str | None]:
    reason = int8_form(node)
    if reason is None:
        return int8_linear, None
    if reason == CHANNEL_GROUPED:
        return torch.ops.lowbit_cpu.group_linear.default, None
    return linear_reference, reason


def _attention(node: torch.fx.Node) -> tuple[Callable, str | None]:
    return windowed_attention_form(node, CPU_TILE) or (attention_reference, None)


CPU_TRANSLATIONS = {QuantizedLinear.overload(): _linear, QuantizedAttention.overload(): _attention}
