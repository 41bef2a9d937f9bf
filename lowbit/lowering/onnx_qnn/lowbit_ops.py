"""Translations of lowbit's domain ops (lowbit/ir/ops.py) for the QNN HTP.

- ``fake_quant``: Q/DQ with lowbit's scale and zero point (grouped: see quantizers.py).
- ``log2_fake_quant``: the Log / Q / DQ / Exp form of the log2 quantizer (quantizers.py).
- ``quantized_linear`` / ``quantized_conv2d``: the input quantizer, then Gemm / Conv with lowbit's
  integer weight behind a DequantizeLinear (layers.py).
- ``quantized_attention``: decomposed into MatMul, Mul (the softmax scale), the mask (a boolean
  or 0/-10000 mask as Where(keep, scores, -``MASK_FLOOR``); another additive mask as an Add of it
  clipped at -``MASK_FLOOR``), Softmax (LogSoftmax for the log2 quantizer) and the probability
  quantizer (uniform, log2, dynamic scale, start-token column: quantizers.attention_probs), and
  MatMul with V — the ONNX
  Attention op falls back to the CPU.
- ``select_timestep``: never emitted; a specialized graph folds it to its constant row.
"""

from __future__ import annotations

import torch

from lowbit.ir import ops  # noqa: F401  (registers torch.ops.lowbit)
from lowbit.ir.annotations import QUANT_KEY
from lowbit.lowering.onnx_qnn import layers, quantizers
from lowbit.lowering.onnx_qnn.specialize import layer_of

__all__ = ["LOWBIT_TRANSLATIONS"]

lowbit = torch.ops.lowbit
# Masked scores end at least this far below the row: their softmax weight is below exp(-100 + spread of
# the raw scores), 1e-30 for scores within 30 of each other — zero in float32, as SDPA's -inf gives.
MASK_FLOOR = 100.0
BINARY_MASK = -1000.0  # an additive mask whose entries are 0 or at most this is a keep/drop mask


def _quantize(em, x: str, shape, scale, zero_point, qmin: int, qmax: int, label: str) -> str:
    scale = em.value(scale)
    zero_point = em.value(zero_point) if zero_point is not None else torch.zeros_like(scale)
    return quantizers.grouped(em, x, tuple(shape), scale, zero_point, qmin, qmax, label)


def _fake_quant(em, node, a):
    return _quantize(em, em.tensor(a["x"]), em.value(a["x"]).shape, a["scale"], a["zero_point"],
                     a["qmin"], a["qmax"], f"{layer_of(node)}:{node.name}")


def _log2_fake_quant(em, node, a):
    scale = float(em.value(a["scale"]).reshape(-1)[0])
    return quantizers.log2(em, em.tensor(a["x"]), em.tensor(scale), int(a["levels"]), clip_above_scale=True,
                           label=f"{layer_of(node)}:{node.name}")


def _weight(em, node, a, shape: tuple[int, ...] | None = None) -> str:
    spec = node.meta[QUANT_KEY].weight if QUANT_KEY in node.meta else None
    qvalues = em.value(a["weight"])
    bits = spec.bits if spec is not None else (8 if qvalues.dtype == torch.int8 else 16)
    return layers.integer_weight(em, qvalues if shape is None else qvalues.reshape(shape), em.value(a["weight_scale"]),
                                 bits, em.hint(a["weight"]))


def _quantized_linear(em, node, a):
    x = em.tensor(a["x"])
    if a["input_scale"] is not None:
        x = _quantize(em, x, em.value(a["x"]).shape, a["input_scale"], a["input_zero_point"], a["input_qmin"],
                      a["input_qmax"], f"{layer_of(node)}:input")
    return layers.gemm(em, x, tuple(em.value(a["x"]).shape), _weight(em, node, a), em.value(a["weight"]).shape[0],
                       em.value(a["bias"]), em.hint(a["weight"]))


def _quantized_conv2d(em, node, a):
    x = em.tensor(a["x"])
    if a["input_scale"] is not None:
        x = _quantize(em, x, em.value(a["x"]).shape, a["input_scale"], a["input_zero_point"], a["input_qmin"],
                      a["input_qmax"], f"{layer_of(node)}:input")
    return layers.conv(em, x, tuple(em.value(a["x"]).shape), lambda shape: _weight(em, node, a, shape),
                       tuple(em.value(a["weight"]).shape), em.value(a["bias"]), a["stride"], a["padding"], a["dilation"],
                       a["groups"], em.hint(a["weight"]))


def _quantized_attention(em, node, a):
    q, k, v = em.tensor(a["q"]), em.tensor(a["k"]), em.tensor(a["v"])
    rank = em.value(a["k"]).dim()
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    scores = em.graph.node("MatMul", [q, em.graph.node("Transpose", [k], perm=perm)])
    scores = em.graph.node("Mul", [scores, em.tensor(float(a["scale"]))])
    mask = a["attn_mask"]
    if mask is not None:
        values = em.value(mask)
        if values.dtype == torch.bool:
            scores = em.graph.node("Where", [em.tensor(mask), scores, em.tensor(-MASK_FLOOR)])
        elif bool(torch.all((values == 0) | (values <= BINARY_MASK))):
            # diffusers' padding mask, 0 or -10000: a select, not an add. On the HTP a 16-bit Add of
            # -10000 onto scores of a few units loses the scores (measured: 46% error in the probabilities)
            keep = em.graph.node("Greater", [em.tensor(mask), em.tensor(-1.0)])
            scores = em.graph.node("Where", [keep, scores, em.tensor(-MASK_FLOOR)])
        else:
            bias = em.graph.node("Clip", [em.tensor(mask), em.tensor(-MASK_FLOOR), ""]) if em.spec.is_runtime(mask) \
                else em.tensor(values.clamp_min(-MASK_FLOOR))
            scores = em.graph.node("Add", [scores, bias])
    probs = quantizers.attention_probs(
        em, scores, em.value(a["k"]).shape[-2], em.value(a["probs_scale"]) if a["probs_scale"] is not None else None,
        em.value(a["probs_zero_point"]) if a["probs_zero_point"] is not None else None,
        a["probs_scheme"], a["probs_qmin"], a["probs_qmax"], a["start_token"], a["dynamic_scale"], f"{layer_of(node)}:probs")
    return em.graph.node("MatMul", [probs, v])


LOWBIT_TRANSLATIONS = {
    lowbit.fake_quant.default: _fake_quant,
    lowbit.log2_fake_quant.default: _log2_fake_quant,
    lowbit.quantized_linear.default: _quantized_linear,
    lowbit.quantized_conv2d.default: _quantized_conv2d,
    lowbit.quantized_attention.default: _quantized_attention,
}
