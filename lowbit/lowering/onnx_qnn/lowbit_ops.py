"""Translations of lowbit's domain ops (lowbit/ir/ops.py) for the QNN HTP.

- ``fake_quant``: Q/DQ with lowbit's scale and zero point (grouped: see quantizers.py).
- ``log2_fake_quant``: the Log / Q / DQ / Exp form of the log2 quantizer (quantizers.py).
- ``quantized_linear`` / ``quantized_conv2d``: the input quantizer, then Gemm / Conv with lowbit's
  integer weight behind a DequantizeLinear (layers.py).
- ``quantized_attention``: decomposed into MatMul, Mul (the softmax scale), the mask (a boolean
  or 0/-10000 mask as Where(keep, scores, -``MASK_FLOOR``); another additive mask as an Add of it
  clipped at -``MASK_FLOOR``), MDWA's windows as one more Where on a constant mask (the windows of
  the graph's step, folded at specialization), Softmax (LogSoftmax for the log2 quantizer) and the probability
  quantizer (uniform, log2, dynamic scale, start-token column: quantizers.attention_probs), and
  MatMul with V — the ONNX
  Attention op falls back to the CPU. With ASC, the computed half of the batch is sliced out first and
  the output concatenated onto itself.
- ``select_timestep``: never emitted; a specialized graph folds it to its constant row.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.ir.annotations import QUANT_KEY
from lowbit.ir.attention_window_statistics import window_keep
from lowbit.ir.packed_weights import integer_codes, unpacked_shape
from lowbit.ir.schema import FakeQuant, Log2FakeQuant, QuantizedAttention, QuantizedConv2d, QuantizedLinear
from lowbit.lowering.onnx_qnn import layers, quantizers
from lowbit.lowering.onnx_qnn.errors import LoweringError
from lowbit.lowering.onnx_qnn.specialize import layer_of

__all__ = ["LOWBIT_TRANSLATIONS"]

# Masked scores end at least this far below the row: their softmax weight is below exp(-100 + spread of
# the raw scores), 1e-30 for scores within 30 of each other — zero in float32, as SDPA's -inf gives.
MASK_FLOOR = 100.0
BINARY_MASK = -1000.0  # an additive mask whose entries are 0 or at most this is a keep/drop mask


def _quantize(em, x: str, shape, scale, zero_point, qmin: int, qmax: int, label: str) -> str:
    scale = em.value(scale)
    zero_point = em.value(zero_point) if zero_point is not None else torch.zeros_like(scale)
    return quantizers.grouped(em, x, tuple(shape), scale, zero_point, qmin, qmax, label)


def _fake_quant(em, node, op):
    return _quantize(em, em.tensor(op.x), em.value(op.x).shape, op.scale, op.zero_point,
                     op.qmin, op.qmax, f"{layer_of(node)}:{node.name}")


def _log2_fake_quant(em, node, op):
    scale = float(em.value(op.scale).reshape(-1)[0])
    return quantizers.log2(em, em.tensor(op.x), em.tensor(scale), int(op.levels), clip_above_scale=True,
                           label=f"{layer_of(node)}:{node.name}")


def _weight(em, node, op, shape: tuple[int, ...] | None = None) -> str:
    spec = node.meta[QUANT_KEY].weight if QUANT_KEY in node.meta else None
    qvalues = integer_codes(em.value(op.weight))
    bits = spec.bits if spec is not None else (8 if qvalues.dtype == torch.int8 else 16)
    return layers.integer_weight(em, qvalues if shape is None else qvalues.reshape(shape), em.value(op.weight_scale),
                                 bits, em.hint(op.weight))


def _quantized_linear(em, node, op):
    x = em.tensor(op.x)
    if op.input_scale is not None:
        x = _quantize(em, x, em.value(op.x).shape, op.input_scale, op.input_zero_point, op.input_qmin,
                      op.input_qmax, f"{layer_of(node)}:input")
    return layers.gemm(em, x, tuple(em.value(op.x).shape), _weight(em, node, op), em.value(op.weight).shape[0],
                       em.value(op.bias), em.hint(op.weight))


def _quantized_conv2d(em, node, op):
    x = em.tensor(op.x)
    if op.input_scale is not None:
        x = _quantize(em, x, em.value(op.x).shape, op.input_scale, op.input_zero_point, op.input_qmin,
                      op.input_qmax, f"{layer_of(node)}:input")
    return layers.conv(em, x, tuple(em.value(op.x).shape), lambda shape: _weight(em, node, op, shape),
                       unpacked_shape(em.value(op.weight)), em.value(op.bias), op.stride, op.padding, op.dilation,
                       op.groups, em.hint(op.weight))


def _batch_half(em, arg, batch: int, half: int) -> tuple[str, torch.Tensor]:
    """(ONNX name, fx value) of half ``half`` of a CFG batch for ``arg``: a Slice of a runtime tensor, the
    sliced constant otherwise; ``arg`` itself where its leading dimension is not the batch (it broadcasts)."""
    value = em.value(arg)
    if value.dim() == 0 or value.shape[0] != batch:
        return em.tensor(arg), value
    n = batch // 2
    if not em.spec.is_runtime(arg):
        return em.tensor(value[half * n : (half + 1) * n]), value[half * n : (half + 1) * n]
    bounds = [em.graph.constant(np.asarray([v], dtype=np.int64), "slice") for v in (half * n, (half + 1) * n, 0)]
    return em.graph.node("Slice", [em.tensor(arg), *bounds]), value[:n]


def _masked(em, scores: str, mask: str, values: torch.Tensor, runtime: bool) -> str:
    if values.dtype == torch.bool:
        return em.graph.node("Where", [mask, scores, em.tensor(-MASK_FLOOR)])
    if bool(torch.all((values == 0) | (values <= BINARY_MASK))):
        # diffusers' padding mask, 0 or -10000: a select, not an add. On the HTP a 16-bit Add of
        # -10000 onto scores of a few units loses the scores (measured: 46% error in the probabilities)
        keep = em.graph.node("Greater", [mask, em.tensor(-1.0)])
        return em.graph.node("Where", [keep, scores, em.tensor(-MASK_FLOOR)])
    bias = em.graph.node("Clip", [mask, em.tensor(-MASK_FLOOR), ""]) if runtime else em.tensor(values.clamp_min(-MASK_FLOOR))
    return em.graph.node("Add", [scores, bias])


def _quantized_attention(em, node, op):
    operands = [op.q, op.k, op.v] + ([op.attn_mask] if op.attn_mask is not None else [])
    if op.shared_half >= 0:  # ASC: the computed half only, its output given to both halves
        halves = [_batch_half(em, x, em.value(op.q).shape[0], op.shared_half) for x in operands]
    else:
        halves = [(em.tensor(x), em.value(x)) for x in operands]
    (q, _), (k, k_value), (v, _) = halves[:3]
    rank = k_value.dim()
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    scores = em.graph.node("MatMul", [q, em.graph.node("Transpose", [k], perm=perm)])
    scores = em.graph.node("Mul", [scores, em.tensor(float(op.scale))])
    if op.attn_mask is not None:
        mask, values = halves[3]
        scores = _masked(em, scores, mask, values, em.spec.is_runtime(op.attn_mask))
    if op.windowed:
        if em.spec.is_runtime(op.window_widths) or em.spec.is_runtime(op.window_lengths):
            raise LoweringError(node.name, str(node.target), layer_of(node), "its attention windows depend on a runtime input",
                                "Export one graph per step (export_schedule): each step's windows are then constants")
        keep = window_keep(em.value(op.q).shape[-2], k_value.shape[-2], em.value(op.window_widths),
                           em.value(op.window_lengths))
        scores = em.graph.node("Where", [em.tensor(keep), scores, em.tensor(-MASK_FLOOR)])
    probs = quantizers.attention_probs(
        em, scores, k_value.shape[-2], em.value(op.probs_scale) if op.probs_scale is not None else None,
        em.value(op.probs_zero_point) if op.probs_zero_point is not None else None,
        op.probs_scheme, op.probs_qmin, op.probs_qmax, op.start_token, op.dynamic_scale, f"{layer_of(node)}:probs")
    out = em.graph.node("MatMul", [probs, v])
    return em.graph.node("Concat", [out, out], axis=0) if op.shared_half >= 0 else out


# each translation receives the node's op schema (lowbit.ir.schema) and reads its fields by name
LOWBIT_TRANSLATIONS = {
    FakeQuant.overload(): _fake_quant,
    Log2FakeQuant.overload(): _log2_fake_quant,
    QuantizedLinear.overload(): _quantized_linear,
    QuantizedConv2d.overload(): _quantized_conv2d,
    QuantizedAttention.overload(): _quantized_attention,
}
