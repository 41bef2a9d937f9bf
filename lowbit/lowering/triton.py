"""Triton target: quantized linears and log2 attention run lowbit's Triton kernels (lowbit.kernels).

A linear whose input is quantized dynamically (LiteVAR: per-token min-max at run time) runs one
fused kernel for range and codes and the W8A8 GEMM; its dynamic_params nodes go unread. Windowed
attention (MDWA) runs FlexAttention's block-sparse kernel (:mod:`lowbit.lowering.windowed_attention`).

The kernels are wrapped as custom ops in the ``lowbit_triton`` namespace, so inductor calls them
as opaque kernels and compiles the rest of the graph (fake quantizers, norms, the reference
arithmetic of anything the kernels do not cover) into its own fused Triton code. On a machine
without CUDA, ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors: that is how CI tests
this target. A weight's kernel layout (with its per-channel integer sums) is prepared on first
use and cached by storage, since dynamo hands weights over as graph inputs.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.fx
from torch import Tensor

from lowbit.ir.ops import attention_reference, linear_reference
from lowbit.ir.packed_weights import PACKED_DTYPE, integer_codes
from lowbit.ir.schema import DynamicParams, QuantizedAttention, QuantizedLinear, schema_class
from lowbit.kernels.common import UINT8_OFFSET, PreparedWeight
from lowbit.kernels.group_gemm import GroupedWeight, group_gemm, prepare_grouped_weight, quantize_grouped
from lowbit.kernels.int4_gemm import int4_gemm, prepare_int4_weight
from lowbit.kernels.int8_gemm import int8_gemm, prepare_weight
from lowbit.kernels.log2_attention import log2_attention
from lowbit.kernels.quantize_activation import quantize_dynamic, quantize_static
from lowbit.lowering.translate import node_shape
from lowbit.lowering.windowed_attention import GPU_TILE, windowed_attention_form
from lowbit.lowering.cpu import CHANNEL_GROUPED, channel_groups, int8_form

__all__ = ["TRITON_TRANSLATIONS"]

_PREPARED: "weakref.WeakKeyDictionary[Tensor, PreparedWeight]" = weakref.WeakKeyDictionary()
_GROUPED: "weakref.WeakKeyDictionary[Tensor, dict[bytes, GroupedWeight]]" = weakref.WeakKeyDictionary()


def _prepared(weight: Tensor, weight_scale: Tensor) -> PreparedWeight:
    """The kernel layout of a stored weight: 4-bit weights stay packed two per byte (read in place)."""
    prepared = _PREPARED.get(weight)
    if prepared is None:
        prepare = prepare_int4_weight if weight.dtype == PACKED_DTYPE else prepare_weight
        prepared = _PREPARED[weight] = prepare(weight, weight_scale)
    return prepared


def _gemm(codes: Tensor, prepared: PreparedWeight, scale: Tensor, zero_point: Tensor, bias: Tensor | None) -> Tensor:
    """The W8A8 or W4A8 GEMM of uint8 codes (lowbit's zero point convention) with a prepared weight."""
    gemm = int4_gemm if prepared.bits == 4 else int8_gemm
    return gemm(codes, prepared, scale, zero_point - UINT8_OFFSET, bias, out_dtype=torch.float32)


def _int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                 input_zero_point: Tensor | None, input_qmin: int, input_qmax: int) -> Tensor:
    """Static per-tensor (or per-row) activation quantizer + W8A8 GEMM with the fused epilogue."""
    qmin, qmax = input_qmin, input_qmax
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    row_shape = (*x.shape[:-1], 1)
    scale = input_scale.float().expand(row_shape).reshape(-1)
    zero_point = (torch.zeros_like(scale) if input_zero_point is None
                  else input_zero_point.float().expand(row_shape).reshape(-1))
    if qmin < 0:  # symmetric codes: move them into lowbit's unsigned convention the quantizer takes
        zero_point, qmin, qmax = zero_point - qmin, 0, qmax - qmin
    codes = quantize_static(rows, scale, zero_point, qmin, qmax)
    y = _gemm(codes, _prepared(weight, weight_scale), scale, zero_point, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _group_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                  input_zero_point: Tensor, input_qmin: int, input_qmax: int) -> Tensor:
    """DGQ channel groups: lowbit stores one (scale, zero point) per input channel, G distinct pairs.
    The pairs become G groups; the weight is reordered group-contiguous once per grouping (a
    per-timestep grouping gives one layout per calibrated timestep) and the group GEMM applies
    each group's parameters to its own integer partial sum."""
    groups, labels = channel_groups(input_scale, input_zero_point)
    layouts = _GROUPED.setdefault(weight, {})
    key = labels.to(torch.int16).cpu().numpy().tobytes()
    if key not in layouts:
        layouts[key] = prepare_grouped_weight(integer_codes(weight), weight_scale, labels, groups.shape[0])  # an int8 copy
    grouped = layouts[key]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    codes = quantize_grouped(rows, grouped, groups[:, 0], groups[:, 1], input_qmin, input_qmax)
    y = group_gemm(codes, grouped, groups[:, 0], groups[:, 1] - UINT8_OFFSET, bias, out_dtype=torch.float32)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


# lowbit::quantized_linear's signature, so that a node's arguments carry over by name
int8_linear = QuantizedLinear.define("lowbit_triton::int8_linear", _int8_linear)
group_linear = QuantizedLinear.define("lowbit_triton::group_linear", _group_linear)


@torch.library.custom_op("lowbit_triton::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """LiteVAR's dynamic per-token activations + W8A8 GEMM: one kernel finds each row's min-max range
    and writes its codes (``quantize_dynamic``), the GEMM applies the per-row parameters in its epilogue."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    codes, scale, zero_point = quantize_dynamic(rows, qmin, qmax)
    y = _gemm(codes, _prepared(weight, weight_scale), scale, zero_point, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


@dynamic_int8_linear.register_fake
def _(x, weight, weight_scale, bias, qmin, qmax):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _dynamic_kernel(**arguments) -> Tensor:
    """The fused kernel in place of a quantized linear whose input parameters are computed from its
    input: the dynamic_params nodes are left unread, and inductor drops them."""
    op = QuantizedLinear(**arguments)
    return torch.ops.lowbit_triton.dynamic_int8_linear.default(op.x, op.weight, op.weight_scale, op.bias, op.input_qmin,
                                                                op.input_qmax)


def _dynamic_per_token(op: QuantizedLinear) -> bool:
    """Whether the input's scale and zero point are its own per-token min-max (DynamicParams of x)."""
    sources = [op.input_scale, op.input_zero_point]
    if not all(isinstance(n, torch.fx.Node) and schema_class(n) is DynamicParams for n in sources):
        return False
    params = [DynamicParams.from_call(*n.args, **n.kwargs) for n in sources]
    return all(p.x is op.x and p.per_token and (p.qmin, p.qmax) == (op.input_qmin, op.input_qmax) for p in params)


@torch.library.custom_op("lowbit_triton::log2_attention", mutates_args=())
def log2_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, levels: int, start_token: int,
                      probs_scale: Tensor | None) -> Tensor:
    """Attention with log2-quantized probabilities and the full-precision start-token column."""
    return log2_attention(q, k, v, scale, levels, start_token, probs_scale)


@log2_attention_op.register_fake
def _(q, k, v, scale, levels, start_token, probs_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _linear(node: torch.fx.Node) -> tuple[Callable, str | None]:
    reason = int8_form(node)
    if reason is None:
        if _dynamic_per_token(QuantizedLinear.of(node)):
            return _dynamic_kernel, None
        return torch.ops.lowbit_triton.int8_linear.default, None
    if reason == CHANNEL_GROUPED:
        return torch.ops.lowbit_triton.group_linear.default, None
    return linear_reference, reason


def _attention_kernel(**arguments) -> Tensor:
    op = QuantizedAttention(**arguments)
    return torch.ops.lowbit_triton.log2_attention.default(op.q, op.k, op.v, op.scale, op.probs_qmax + 1, op.start_token,
                                                          None if op.dynamic_scale else op.probs_scale)


def _attention(node: torch.fx.Node) -> tuple[Callable, str | None]:
    op = QuantizedAttention.of(node)
    shape = node_shape(op.q) or ()
    windowed = windowed_attention_form(node, GPU_TILE)
    if windowed is not None:
        return windowed
    if op.probs_scheme != "log2":
        return attention_reference, None  # inductor fuses softmax + uniform quantizer + matmuls itself
    if op.attn_mask is not None:
        return attention_reference, "attention mask: the log2 kernel takes none"
    if op.shared_half >= 0:
        return attention_reference, "CFG sharing: the log2 kernel computes every sample"
    if len(shape) != 4:
        return attention_reference, f"q of rank {len(shape)}: the log2 kernel takes (batch, heads, tokens, dim)"
    return _attention_kernel, None


TRITON_TRANSLATIONS = {
    QuantizedLinear.overload(): _linear,
    QuantizedAttention.overload(): _attention,
}
