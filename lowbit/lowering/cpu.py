"""CPU target: quantized linears as int8 x int8 GEMMs on oneDNN's prepacked weights (VNNI and AMX
kernels: :mod:`lowbit.lowering.onednn`; ``torch._int_mm`` where PyTorch was built without oneDNN).

lowbit stores activations as asymmetric integers in [qmin, qmax] with a zero point z, weights as
symmetric int8 with one scale per output channel. An input with one scale whose grid an 8-bit type
holds (uint8 for [0, 255], int8 for [-128, 127] and their sub-ranges) goes to oneDNN as its codes,
with its scale and zero point: one call computes the GEMM, the zero point's correction, the scales
and the bias. A per-token input scale (LiteVAR's dynamic ranges) takes the codes shifted by
c = (qmin + qmax + 1) // 2 into int8, and the rest in an epilogue inductor fuses with the quantizer
prologue:

    y[m, n] = s_x[m] * s_w[n] * (sum_k (q[m, k] - c) w[n, k] - (z[m] - c) * sum_k w[n, k]) + b[n]

The integer sums are exact, so the result equals the reference ``quantized_linear`` up to float32
rounding. A linear followed by GELU and by a linear whose input grid is a whole 8-bit type (a
transformer's MLP) runs as one oneDNN call with GELU in its epilogue and the next linear's quantizer
after it, writing that layer's input codes: the float activations between the two never exist.
Packed 4-bit weights run lowbit's int4 kernel instead (:mod:`lowbit.lowering.int4_linear`), with
the same chain. DGQ's channel groups give each input channel its own (scale, zero point), G distinct pairs: the
channels are reordered group by group once per grouping, and each group's integer partial sum gets
its own parameters (``group_linear``). Activations wider than 8 bits have no int8 form and run the
reference arithmetic; the translation report names them.

Quantized attention runs on integer codes in blocks of query rows, or in query tiles of the
reference arithmetic, so the probability matrix never exists whole
(:mod:`lowbit.lowering.tiled_attention`); windowed attention (MDWA) on float probabilities runs a
block-sparse kernel, lowbit's own on AVX512 hosts, else FlexAttention's
(:mod:`lowbit.lowering.windowed_attention`).
Everything else (convolutions, fake quantizers) is the reference arithmetic, inlined for inductor to fuse.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.ir.ops import conv2d_reference, linear_reference
from lowbit.ir.packed_weights import integer_codes
from lowbit.ir.schema import QuantizedAttention, QuantizedConv2d, QuantizedLinear
from lowbit.lowering.int4_linear import int4_chained, int4_linear, int4_linear_takes
from lowbit.lowering.onednn import int8_matmul, quantized_conv2d, quantized_matmul
from lowbit.lowering.tiled_attention import tiled_attention_form
from lowbit.lowering.translate import node_dtype, node_shape
from lowbit.lowering.windowed_attention import CPU_TILE, windowed_attention_form

__all__ = ["CHANNEL_GROUPED", "CPU_TRANSLATIONS", "channel_groups", "group_linear", "int8_form", "int8_linear"]

_INT8_LEVELS = 256
CHANNEL_GROUPED = "channel-grouped input scale (DGQ groups) varies along the reduced dimension"
_CODES_INPUT = "lowbit.cpu.codes_input"  # node meta: this linear's input arrives as its codes (written by the linear before)
_GELU = torch.ops.aten.gelu.default
_DROPOUT = torch.ops.aten.dropout.default


def _code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    """The 8-bit integer type that holds the grid [qmin, qmax] as it is, if one does."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    return torch.int8 if -128 <= qmin and qmax <= 127 else None


def _fused_call_takes(scale_shape: tuple[int, ...] | None, qmin: int, qmax: int) -> bool:
    """Whether oneDNN's fused call takes an input: one scale, a grid an 8-bit type holds (and a PyTorch
    built with oneDNN)."""
    return (scale_shape is not None and all(d == 1 for d in scale_shape) and _code_dtype(qmin, qmax) is not None
            and torch.backends.mkldnn.is_available())


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    # x times 1 / scale, not x / scale: a vector division costs more than the rest of the quantizer
    # (measured on the SD block); the two differ by an ulp, so a code moves only where x / scale is a tie
    return torch.clamp(torch.round(x.float() * torch.reciprocal(scale)) + zero_point, qmin, qmax).to(_code_dtype(qmin, qmax))


def _zero_point(op_zero_point: Tensor | None, scale: Tensor) -> Tensor:
    return torch.zeros_like(scale) if op_zero_point is None else op_zero_point


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                input_zero_point: Tensor | None, input_qmin: int, input_qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` as int8 GEMMs; the input scale is per tensor (one fused oneDNN call)
    or per row (shifted codes, the zero point and scales applied in an epilogue inductor fuses)."""
    qmin, qmax = input_qmin, input_qmax
    zero_point = _zero_point(input_zero_point, input_scale)
    if _fused_call_takes(tuple(input_scale.shape), qmin, qmax):
        codes = _codes(x, input_scale, zero_point, qmin, qmax)
        return quantized_matmul(codes, input_scale, zero_point, weight, weight_scale, bias).to(x.dtype)
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    row_shape = (*x.shape[:-1], 1)
    scale = input_scale.float().expand(row_shape).reshape(-1, 1)
    zero_point = zero_point.float().expand(row_shape).reshape(-1, 1)
    shift = (qmin + qmax + 1) // 2
    q = (torch.clamp(torch.round(rows / scale) + zero_point, qmin, qmax) - shift).to(torch.int8)
    acc = int8_matmul(q, weight)
    weight_sums = integer_codes(weight).sum(1, dtype=torch.int32)
    y = (acc - (zero_point - shift) * weight_sums) * (scale * weight_scale.float())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _chained_linear(dtype: torch.dtype, codes_input: bool, gelu: str | None = None) -> Callable:
    """A per-tensor int8 linear computing ``dtype`` whose input arrives as codes (``codes_input``) and/or
    which applies GELU and writes the next linear's input codes (``gelu``: that GELU's ``approximate``)."""

    def run(*, output_scale: Tensor | None = None, output_zero_point: Tensor | None = None,
            output_grid: tuple[int, int] | None = None, **arguments) -> Tensor:
        op = QuantizedLinear(**arguments)
        zero_point = _zero_point(op.input_zero_point, op.input_scale)
        codes = op.x if codes_input else _codes(op.x, op.input_scale, zero_point, op.input_qmin, op.input_qmax)
        if gelu is None:
            return quantized_matmul(codes, op.input_scale, zero_point, op.weight, op.weight_scale, op.bias).to(dtype)
        return quantized_matmul(codes, op.input_scale, zero_point, op.weight, op.weight_scale, op.bias, gelu, output_scale,
                                _zero_point(output_zero_point, output_scale), _code_dtype(*output_grid))

    return run


def _passthrough(x: Tensor, *args, **kwargs) -> Tensor:
    """A GELU done in the epilogue of the linear before it, or an inference dropout after that GELU."""
    return x


def channel_groups(input_scale: Tensor, input_zero_point: Tensor) -> tuple[Tensor, Tensor]:
    """DGQ's per-channel parameters as G distinct (scale, zero point) rows [G, 2] and each
    channel's group label [K]."""
    pairs = torch.stack([input_scale.float().reshape(-1), input_zero_point.float().reshape(-1)], 1)
    return torch.unique(pairs, dim=0, return_inverse=True)


_LAYOUTS: "WeakIdKeyDictionary[Tensor, dict[bytes, tuple]]" = WeakIdKeyDictionary()


def _group_layout(weight: Tensor, labels: Tensor) -> tuple[Tensor, list[tuple[int, int, Tensor, Tensor]]]:
    """Channel order (group by group) and, per non-empty group g, its channel span in that order,
    its weight columns (contiguous, so that ``int8_matmul`` packs them once) and their sums."""
    layouts = _LAYOUTS.setdefault(weight, {})
    key = labels.to(torch.int16).numpy().tobytes()
    if key not in layouts:
        order = torch.sort(labels, stable=True).indices
        bounds = [0, *torch.bincount(labels).cumsum(0).tolist()]
        reordered = integer_codes(weight)[:, order]  # an int8 copy, group by group
        parts = [(g, a, reordered[:, a:b].contiguous()) for g, (a, b) in enumerate(zip(bounds, bounds[1:])) if a < b]
        layouts[key] = (order, [(g, a, w, w.sum(1, dtype=torch.int32)) for g, a, w in parts])
    return layouts[key]


def _group_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor,
                  input_zero_point: Tensor, input_qmin: int, input_qmax: int) -> Tensor:
    """``lowbit.quantized_linear`` with DGQ channel groups: one int8 GEMM per group, summed."""
    qmin, qmax = input_qmin, input_qmax
    groups, labels = channel_groups(input_scale, input_zero_point)
    order, parts = _group_layout(weight, labels)
    rows = x.reshape(-1, x.shape[-1]).float()[:, order]
    shift = (qmin + qmax + 1) // 2
    y = torch.zeros(rows.shape[0], weight.shape[0])
    for g, start, group_weight, sums in parts:
        scale, zero_point = groups[g, 0], groups[g, 1]
        q = (torch.clamp(torch.round(rows[:, start : start + group_weight.shape[1]] / scale) + zero_point, qmin, qmax) - shift)
        acc = int8_matmul(q.to(torch.int8), group_weight) - (int(zero_point) - shift) * sums
        y += scale * acc
    y = y * weight_scale.float()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


group_linear = QuantizedLinear.define("lowbit_cpu::group_linear", _group_linear)


def int8_form(node: torch.fx.Node) -> str | None:
    """None when a ``quantized_linear`` node has an int8 form, else why not."""
    op = QuantizedLinear.of(node)
    if op.input_scale is None:
        return "input not quantized"
    if op.input_levels > _INT8_LEVELS:
        return f"{op.input_levels.bit_length() - 1}-bit activations do not fit int8"
    x_shape, scale_shape = node_shape(op.x), node_shape(op.input_scale)
    if x_shape and scale_shape and scale_shape[-1] != 1 and scale_shape[-1] == x_shape[-1]:
        return CHANNEL_GROUPED if op.input_zero_point is not None else "channel-grouped input without zero points"
    return None


def _one_scale_int8(node: torch.fx.Node) -> bool:
    """Whether a ``quantized_linear`` node takes the fused oneDNN call: one input scale, an 8-bit grid, and a
    weight that is not better left packed for the int4 kernel."""
    op = QuantizedLinear.of(node)
    return (int8_form(node) is None and _fused_call_takes(node_shape(op.input_scale), op.input_qmin, op.input_qmax)
            and not int4_linear_takes(node))


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _chain_form(node: torch.fx.Node) -> Callable | None:
    """What makes a ``quantized_linear`` node's chained form (``_chained_linear`` for oneDNN's fused call,
    ``int4_chained`` for the int4 kernel with one input scale), or None where it joins no chain."""
    if _one_scale_int8(node):
        return _chained_linear
    scale_shape = node_shape(QuantizedLinear.of(node).input_scale)
    one_scale = scale_shape is not None and all(d == 1 for d in scale_shape)
    return int4_chained if one_scale and int4_linear_takes(node) else None


def _gelu_chain(node: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """(the GELU and inference dropouts after it, next linear) when ``node``'s output feeds only a
    GELU, through dropouts that do nothing (``train`` False), into a linear of the same chained form
    whose grid that form writes: a whole 8-bit type for oneDNN (it saturates to the type), any grid of
    codes from 0 up for the int4 kernel."""
    gelu = _only_user(node)
    if gelu is None or gelu.target is not _GELU:
        return None
    between, following = [gelu], _only_user(gelu)
    while following is not None and following.target is _DROPOUT and not following.args[2]:
        between.append(following)
        following = _only_user(following)
    if following is None or following.op != "call_function" or following.target != QuantizedLinear.overload():
        return None
    op, form = QuantizedLinear.of(following), _chain_form(following)
    if form is None or form is not _chain_form(node):
        return None
    writable = (op.input_qmin, op.input_qmax) in ((0, 255), (-128, 127)) if form is _chained_linear else op.input_qmin >= 0
    return (between, following) if op.x is between[-1] and writable else None


def _hoist(values: list[torch.fx.Node], anchor: torch.fx.Node) -> bool:
    """Move ``values`` and what they read, where they come after ``anchor``, to just before it; False
    (nothing moved) where one of them depends on ``anchor``."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    late: list[torch.fx.Node] = []

    def collect(n: torch.fx.Node) -> bool:
        if order[n] < order[anchor] or n in late:
            return True
        if n is anchor or not all(collect(arg) for arg in n.all_input_nodes):
            return False
        late.append(n)
        return True

    if not all(collect(v) for v in values if isinstance(v, torch.fx.Node)):
        return False
    for n in sorted(late, key=order.get):
        anchor.prepend(n)
    return True


def _linear(node: torch.fx.Node) -> tuple[Callable, str | None]:
    """Chooses a linear's form; a GELU chain (oneDNN's or the int4 kernel's) is fused here: the GELU node
    becomes a pass-through, the next linear is marked to read codes, and this node gains the next
    quantizer's parameters."""
    make = _chain_form(node)
    if make is not None:
        codes_input = node.meta.get(_CODES_INPUT, False)
        chain = _gelu_chain(node)
        if chain is not None:
            (gelu, *dropouts), following = chain
            after = QuantizedLinear.of(following)
            if _hoist([after.input_scale, after.input_zero_point], node):
                node.update_kwarg("output_scale", after.input_scale)
                node.update_kwarg("output_zero_point", after.input_zero_point)
                node.update_kwarg("output_grid", (after.input_qmin, after.input_qmax))
                approximate = gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")
                for passed in (gelu, *dropouts):
                    passed.target = _passthrough
                following.meta[_CODES_INPUT] = True
                return make(node_dtype(node), codes_input, approximate), None
        if codes_input:
            return make(node_dtype(node), True), None
        return (int8_linear if make is _chained_linear else int4_linear), None
    if int4_linear_takes(node):
        return int4_linear, None
    reason = int8_form(node)
    if reason is None:
        return int8_linear, None
    if reason == CHANNEL_GROUPED:
        return torch.ops.lowbit_cpu.group_linear.default, None
    return linear_reference, reason


def _conv(**arguments) -> Tensor:
    op = QuantizedConv2d(**arguments)
    zero_point = _zero_point(op.input_zero_point, op.input_scale)
    # channels-last codes, oneDNN's layout: written so by the quantizer's kernel, where oneDNN would copy them
    codes = _codes(op.x, op.input_scale, zero_point, op.input_qmin, op.input_qmax).contiguous(memory_format=torch.channels_last)
    return quantized_conv2d(codes, op.input_scale, zero_point, op.weight, op.weight_scale, op.bias, list(op.stride),
                            list(op.padding), list(op.dilation), op.groups).to(op.x.dtype)


def _conv2d(node: torch.fx.Node) -> tuple[Callable, str | None]:
    """oneDNN's int8 convolution for an input with one scale on an 8-bit grid, else the reference (inductor's)."""
    op = QuantizedConv2d.of(node)
    if not _fused_call_takes(node_shape(op.input_scale), op.input_qmin, op.input_qmax) or len(node_shape(op.x) or ()) != 4:
        return conv2d_reference, None
    return _conv, None


def _attention(node: torch.fx.Node) -> tuple[Callable, str | None]:
    return windowed_attention_form(node, CPU_TILE) or (tiled_attention_form(node), None)


CPU_TRANSLATIONS = {QuantizedLinear.overload(): _linear, QuantizedConv2d.overload(): _conv2d, QuantizedAttention.overload(): _attention}
