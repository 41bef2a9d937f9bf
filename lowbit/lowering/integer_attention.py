"""Quantized attention on integer codes in the CPU's bf16 matrix units: exact, and fast where the host has AMX.

Where a recipe quantizes q, k, v and the probabilities to at most 8 bits, every operand of the two
attention products is an integer code times a scale: (c - z) fits in [-255, 255], which bf16 holds
exactly, and a bf16 GEMM accumulates in float32, exactly while the sums stay below 2^24 (q kᵀ: head
dim x 255² < 2^24 up to 258 dims; P V rounds past 2^24 like the float32 reference). So the kernel
(``csrc/integer_attention.cpp``) multiplies the codes on the bf16 units and applies the scales
after, computing what ``lowbit.quantized_attention`` computes, block by block of query rows with
the logits, the softmax and the quantizer in cache. It needs ATen's bf16 brgemm (AMX or
AVX512-BF16) and is compiled for the host on first use (``torch.utils.cpp_extension``).

The graph hands the kernel q, k and v before their ``fake_quant`` nodes, with those quantizers'
parameters, and the kernel computes the codes itself (the fake quantizers, left unread, are dropped
by inductor). Scales may be per tensor or per token for q and k (they factor out of each row and
column of q kᵀ); v needs one scale (a per-token v scale would weight the probabilities unevenly,
off the grid).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx
from torch import Tensor

from lowbit.ir.ops import on_shared_half
from lowbit.ir.schema import FakeQuant, QuantizedAttention
from lowbit.lowering.native import has_bf16_brgemm
from lowbit.lowering.translate import node_shape

__all__ = ["MAX_CODE", "integer_attention", "integer_attention_form"]

MAX_CODE = 255  # |c - z| of an 8-bit grid; bf16 holds integers exactly up to 256


def _per_row(scale: Tensor, shape: torch.Size) -> Tensor:
    """A per-tensor or per-token scale as a view of one value per row of a (..., tokens, dim) operand (no copy)."""
    return scale.float().expand(*shape[:-1], 1).squeeze(-1)


@torch.library.custom_op("lowbit_cpu::integer_attention", mutates_args=())
def integer_attention(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, q_zero_point: Tensor, k_scale: Tensor,
                      k_zero_point: Tensor, v_scale: Tensor, v_zero_point: Tensor, grids: list[int], scale: float,
                      probs_scale: Tensor, probs_zero_point: Tensor | None, probs_scheme: str, probs_qmin: int, probs_qmax: int,
                      start_token: int, shared_half: int) -> Tensor:
    """``lowbit.quantized_attention`` of q, k, v (batch, heads, tokens, dim) given before their quantizers
    (scale and zero point per tensor or per token, v per tensor; ``grids`` their (qmin, qmax)), with
    static probability quantization, no mask and no windows, on integer codes; the output is (batch,
    tokens, heads, dim), the layout the output projection reads (the graph transposes it back as a view)."""
    zero_point = 0.0 if probs_zero_point is None else float(probs_zero_point)

    def attend(q: Tensor, k: Tensor, v: Tensor, *params: Tensor) -> Tensor:
        rows = [_per_row(param, x.shape) for param, x in zip(params, (q, q, k, k, v, v))]
        return torch.ops.lowbit_native.integer_attention(
            q.float(), k.float(), v.float(), *rows, grids, scale, float(probs_scale), zero_point, probs_scheme == "log2",
            probs_qmin, probs_qmax, start_token).to(q.dtype)

    return on_shared_half(shared_half, (q, k, v, q_scale, q_zero_point, k_scale, k_zero_point, v_scale, v_zero_point), attend)


@integer_attention.register_fake
def _(q, k, v, q_scale, q_zero_point, k_scale, k_zero_point, v_scale, v_zero_point, grids, scale, probs_scale,
      probs_zero_point, probs_scheme, probs_qmin, probs_qmax, start_token, shared_half):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))


def _quantizer(node: object, per_row: bool) -> FakeQuant | None:
    """The quantizer of an attention operand whose codes the kernel can compute: a ``fake_quant`` of at
    most 8 bits with one scale and zero point (or, with ``per_row``, one per token)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == FakeQuant.overload()):
        return None
    quantizer = FakeQuant.of(node)
    shape = node_shape(node)
    params = [node_shape(quantizer.scale), node_shape(quantizer.zero_point)]
    if quantizer.qmax - quantizer.qmin > MAX_CODE or shape is None or None in params:
        return None
    if all(math.prod(p) == 1 or (per_row and len(p) <= len(shape) and p[-1] == 1) for p in params):
        return quantizer
    return None


_OPERANDS = ("q", "k", "v")


def _run(**arguments) -> Tensor:
    params = {name: arguments.pop(name) for name in [f"{o}_{p}" for o in _OPERANDS for p in ("scale", "zero_point")]}
    grids = arguments.pop("grids")
    op = QuantizedAttention(**arguments)
    return torch.ops.lowbit_cpu.integer_attention.default(
        op.q, op.k, op.v, *params.values(), grids, op.scale, op.probs_scale, op.probs_zero_point, op.probs_scheme,
        op.probs_qmin, op.probs_qmax, op.start_token, op.shared_half).transpose(1, 2)


def integer_attention_form(node: torch.fx.Node) -> Callable | None:
    """The integer-code form of an attention node, or None where it has none (on this host, or for
    this node: windows, a mask, a dynamic probability scale, operands not 4-D on 8-bit grids). The node
    then reads q, k, v before their quantizers, and their parameters (the quantizers, unread, are
    left for the compiler to drop)."""
    op = QuantizedAttention.of(node)
    if op.windowed or op.attn_mask is not None or op.dynamic_scale or op.probs_scheme not in ("uniform", "log2"):
        return None
    if op.probs_scheme == "uniform" and op.probs_qmax - op.probs_qmin > MAX_CODE or len(node_shape(op.q) or ()) != 4:
        return None
    quantizers = [_quantizer(op.q, True), _quantizer(op.k, True), _quantizer(op.v, False)]
    if None in quantizers or not has_bf16_brgemm():
        return None
    grids = []
    for name, quantizer in zip(_OPERANDS, quantizers):
        node.update_kwarg(name, quantizer.x)
        node.update_kwarg(f"{name}_scale", quantizer.scale)
        node.update_kwarg(f"{name}_zero_point", quantizer.zero_point)
        grids += [quantizer.qmin, quantizer.qmax]
    node.update_kwarg("grids", grids)
    return _run
