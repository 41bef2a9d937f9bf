"""lowbit's quantizers as QuantizeLinear/DequantizeLinear in what the QNN HTP runs.

- Uniform, one scale per tensor: one Q/DQ pair with lowbit's scale and zero point, exactly.
  The integer container is unsigned (the HTP takes uint8/uint16 activations, not int8): a
  symmetric quantizer's codes are shifted by -qmin. Bit-widths below the container's (6-bit in
  uint8) get a Clip to lowbit's range before the Q, so the clamp is lowbit's, not the container's.
- Uniform with groups (DGQ eq. 6-7: channel, token or pixel groups): the HTP rejects
  per-axis activation quantization (measured: "Failed to compose Qnn graph"). The vectors are
  gathered so that each group is contiguous, split, quantized with one Q/DQ per group, concatenated
  and gathered back: 2 Gathers + 1 Split + 1 Concat + K Q/DQ pairs, each tensor moved about 3 times.
  The concatenated values are exact on each group's grid; the tensor that carries them is then
  16-bit (legalize.py), which rounds them by at most half a 16-bit step of the union range:
  (union range / group range) / 514 of the group's own step.
- Log2 (DGQ eq. 2, attention probabilities): the HTP has no log2 type. With y = x / s,
  Q(Log(y); scale ln 2, zero point L-1) = clamp(round(log2 y) + L - 1, 0, container max) is the
  log2 code (k = L - 1 - code) — the QuantizeLinear's own rounding and clamping do the work — and
  Exp(DQ(code)) = 2^(-k), so x_hat = s * Exp(DQ(Q(Log(x / s)))) exactly as lowbit's reference, up
  to the HTP's fixed-point Log near rounding boundaries. Cost: Mul (or Div), Log, Exp, Mul.
- Dynamic scale (DGQ eq. 8: s = max of the tensor at run time): a ReduceMax to a scalar and a
  Div/Mul by it, computed on the HTP; no static approximation needed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["LOG_FLOOR", "QUANTIZER_KEY", "attention_probs", "container", "dynamic_uniform", "grouped", "log2",
           "log2_from_log_probs", "per_tensor"]

QUANTIZER_KEY = "lowbit.quantizer"  # metadata on the Q/DQ nodes that carry a lowbit quantizer's own parameters
LOG_FLOOR = 30.0


def container(qmin: int, qmax: int, zero_point: float) -> tuple[type, int, int]:
    """(numpy dtype, shifted zero point, shifted qmax) of the unsigned container for [qmin, qmax]."""
    span = int(qmax) - int(qmin)
    if span > 65535:
        raise ValueError(f"a {span + 1}-level quantizer does not fit a 16-bit container")
    dtype = np.uint8 if span <= 255 else np.uint16
    return dtype, int(round(float(zero_point))) - int(qmin), span


def per_tensor(em, x: str, scale: float, zero_point: float, qmin: int, qmax: int, label: str) -> str:
    dtype, zp, span = container(qmin, qmax, zero_point)
    if span < np.iinfo(dtype).max:
        lo, hi = (0 - zp) * scale, (span - zp) * scale
        x = em.graph.node("Clip", [x, em.tensor(float(lo)), em.tensor(float(hi))])
    s = em.graph.constant(np.asarray(scale, np.float32), "scale")
    z = em.graph.constant(np.asarray(zp, dtype), "zero_point")
    q = em.graph.node("QuantizeLinear", [x, s, z], hint="q", meta={QUANTIZER_KEY: label})
    return em.graph.node("DequantizeLinear", [q, s, z], hint="dq", meta={QUANTIZER_KEY: label})


def _vector_axes(x_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> list[int]:
    offset = len(x_shape) - len(scale_shape)
    return [offset + i for i, n in enumerate(scale_shape) if n > 1]


def grouped(em, x: str, x_shape: tuple[int, ...], scale: torch.Tensor, zero_point: torch.Tensor,
            qmin: int, qmax: int, label: str) -> str:
    """Group quantization: one scale and zero point per group of vectors along some axes."""
    axes = _vector_axes(tuple(x_shape), tuple(scale.shape))
    if not axes:
        return per_tensor(em, x, float(scale.reshape(-1)[0]), float(zero_point.reshape(-1)[0]), qmin, qmax, label)
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise NotImplementedError(f"{label}: group axes {axes} are not contiguous")
    flat_scale = scale.reshape(-1).float()
    flat_zp = zero_point.reshape(-1).float()
    keys = torch.stack([flat_scale, flat_zp], 1)
    groups, labels = torch.unique(keys, dim=0, return_inverse=True)
    if len(groups) == 1:
        return per_tensor(em, x, float(groups[0, 0]), float(groups[0, 1]), qmin, qmax, label)
    axis = axes[0]
    merged = list(x_shape[:axis]) + [int(np.prod([x_shape[a] for a in axes]))] + list(x_shape[axes[-1] + 1:])
    shape = lambda v: em.graph.constant(np.asarray(v, np.int64), "shape")  # noqa: E731
    src = em.graph.node("Reshape", [x, shape(merged)]) if len(axes) > 1 else x
    order = torch.argsort(labels, stable=True)
    identity = bool(torch.equal(order, torch.arange(len(order))))
    if not identity:
        src = em.graph.node("Gather", [src, em.graph.constant(order.numpy().astype(np.int64), "group_order")], axis=axis)
    sizes = torch.bincount(labels, minlength=len(groups)).tolist()
    parts = em.graph.node("Split", [src, shape(sizes)], outputs=len(sizes), axis=axis)
    quantized = [per_tensor(em, p, float(groups[g, 0]), float(groups[g, 1]), qmin, qmax, f"{label}#group{g}")
                 for g, p in enumerate(parts)]
    out = em.graph.node("Concat", quantized, axis=axis)
    if not identity:
        inverse = torch.argsort(order)
        out = em.graph.node("Gather", [out, em.graph.constant(inverse.numpy().astype(np.int64), "group_inverse")], axis=axis)
    return em.graph.node("Reshape", [out, shape(list(x_shape))]) if len(axes) > 1 else out


def log2(em, x: str, scale: str, levels: int, clip_above_scale: bool, label: str) -> str:
    """s * 2^(-clamp(round(-log2(x / s)), 0, levels - 1)) with ``scale`` an ONNX scalar tensor."""
    dtype = np.uint8 if levels <= 256 else np.uint16
    y = em.graph.node("Div", [x, scale])
    log = em.graph.node("Log", [y])
    if clip_above_scale or levels - 1 < np.iinfo(dtype).max:
        log = em.graph.node("Clip", [log, "", em.tensor(0.0)])
    s = em.graph.constant(np.asarray(math.log(2.0), np.float32), "ln2")
    z = em.graph.constant(np.asarray(levels - 1, dtype), "zero_point")
    q = em.graph.node("QuantizeLinear", [log, s, z], hint="q_log2", meta={QUANTIZER_KEY: label})
    dq = em.graph.node("DequantizeLinear", [q, s, z], hint="dq_log2", meta={QUANTIZER_KEY: label})
    return em.graph.node("Mul", [em.graph.node("Exp", [dq]), scale])


def log2_from_log_probs(em, log_probs: str, log_scale: str, levels: int, clip_above_scale: bool, label: str) -> str:
    """The log2 quantizer from log-probabilities: s * 2^(-k), k = clamp(round(log2 s - log2 p), 0, L-1).

    A uint16 probability has a step of 1.5e-5, so a probability of 1e-3 is off by 1.5% and its code
    flips; a uint16 log-probability has the same absolute step at every magnitude."""
    dtype = np.uint8 if levels <= 256 else np.uint16
    t = em.graph.node("Sub", [log_probs, log_scale])
    if clip_above_scale or levels - 1 < np.iinfo(dtype).max:
        t = em.graph.node("Clip", [t, "", em.tensor(0.0)])
    s = em.graph.constant(np.asarray(math.log(2.0), np.float32), "ln2")
    z = em.graph.constant(np.asarray(levels - 1, dtype), "zero_point")
    q = em.graph.node("QuantizeLinear", [t, s, z], hint="q_log2", meta={QUANTIZER_KEY: label})
    dq = em.graph.node("DequantizeLinear", [q, s, z], hint="dq_log2", meta={QUANTIZER_KEY: label})
    return em.graph.node("Exp", [em.graph.node("Add", [dq, log_scale])])


def dynamic_uniform(em, x: str, scale: str, zero_point: float, qmin: int, qmax: int, label: str) -> str:
    """Uniform quantization with a run-time step s: s * DQ(Q(x / s)) with unit scale."""
    y = em.graph.node("Div", [x, scale])
    return em.graph.node("Mul", [per_tensor(em, y, 1.0, zero_point, qmin, qmax, label), scale])


def _columns(em, x: str, lo: int, hi: int) -> str:
    c = lambda v: em.graph.constant(np.asarray([v], np.int64), "index")  # noqa: E731
    return em.graph.node("Slice", [x, c(lo), c(hi), c(-1)])


def _without_column(em, x: str, column: int, width: int) -> str:
    pieces = ([_columns(em, x, 0, column)] if column > 0 else []) + ([_columns(em, x, column + 1, width)] if column + 1 < width else [])
    return pieces[0] if len(pieces) == 1 else em.graph.node("Concat", pieces, axis=-1)


def _with_column(em, rest: str, keep: str, column: int, width: int) -> str:
    if column == 0:
        return em.graph.node("Concat", [keep, rest], axis=-1)
    if column + 1 >= width:
        return em.graph.node("Concat", [rest, keep], axis=-1)
    return em.graph.node("Concat", [_columns(em, rest, 0, column), keep, _columns(em, rest, column, width - 1)], axis=-1)


def attention_probs(em, scores: str, width: int, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                    scheme: str, qmin: int, qmax: int, start_token: int, dynamic: bool, label: str) -> str:
    """softmax(scores) quantized as lowbit.ir.ops.quantize_probs does: the start-token column kept,
    the rest uniform (static or run-time scale) or log2 (from LogSoftmax, static or run-time scale)."""
    if not dynamic and scheme != "none" and scale is None:
        raise ValueError(f"{label}: static probability quantization needs a scale")
    if scheme == "log2":
        # log p below -LOG_FLOOR (p < 1e-13) is held there: its log2 value s 2^-k changes by < 1e-13
        log_probs = em.graph.node("Clip", [em.graph.node("LogSoftmax", [scores], axis=-1), em.tensor(-LOG_FLOOR), ""])
        rest = _without_column(em, log_probs, start_token, width) if start_token >= 0 else log_probs
        log_scale = em.graph.node("ReduceMax", [rest], keepdims=0) if dynamic else em.tensor(math.log(float(scale.reshape(-1)[0])))
        out = log2_from_log_probs(em, rest, log_scale, qmax + 1, clip_above_scale=not dynamic, label=label)
        if start_token < 0:
            return out
        return _with_column(em, out, em.graph.node("Exp", [_columns(em, log_probs, start_token, start_token + 1)]), start_token, width)
    probs = em.graph.node("Softmax", [scores], axis=-1)
    if scheme == "none":
        return probs
    rest = _without_column(em, probs, start_token, width) if start_token >= 0 else probs
    zp = float(zero_point.reshape(-1)[0]) if zero_point is not None else 0.0
    if dynamic:  # the grid [0, s], s = max of the tensor at run time (> 0: a softmax row sums to 1)
        step = em.graph.node("Div", [em.graph.node("ReduceMax", [rest], keepdims=0), em.tensor(float(qmax - qmin))])
        out = dynamic_uniform(em, rest, step, float(qmin), qmin, qmax, label)
    else:
        out = per_tensor(em, rest, float(scale.reshape(-1)[0]), zp, qmin, qmax, label)
    if start_token < 0:
        return out
    return _with_column(em, out, _columns(em, probs, start_token, start_token + 1), start_token, width)
