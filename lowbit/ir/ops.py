"""lowbit's domain ops, declared with ``torch.library.custom_op`` in the ``lowbit`` namespace.

Each op's body here is the reference CPU implementation: the numerical ground truth that
every lowering (Triton, CPU int8, ONNX for QNN) is tested against. Each has a fake (meta)
implementation so that torch.export and torch.compile can trace through it. The ops' signatures
come from their schemas (``lowbit.ir.schema``); the bodies take their arguments by those names.

Quantization parameters arrive as tensors already shaped to broadcast against the operand
(a per-channel scale of a (B, N, C) input is (C,)), so one op serves every granularity.
Rounding is round-half-to-even (``torch.round``), as in the official DGQ and Q-Diffusion code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.ir.attention_window_statistics import window_keep
from lowbit.ir.packed_weights import integer_codes
from lowbit.ir.schema import DynamicParams, FakeQuant, Log2FakeQuant, OpSchema, QuantizedAttention, QuantizedConv2d, QuantizedLinear, SelectTimestep

__all__ = [
    "REFERENCES",
    "TINY",
    "attention_probs",
    "attention_reference",
    "asymmetric_params",
    "batch_half",
    "conv2d_reference",
    "dynamic_params",
    "linear_reference",
    "on_shared_half",
    "probs_params",
    "probs_peak",
    "quantize_probs",
    "timestep_row",
    "uniform_quantize",
    "log2_quantize",
]

TINY = 1e-30  # the smallest run-time scale: an all-zero tensor quantizes to zeros, not NaN
_EPS = 1e-8  # the smallest quantization scale


def uniform_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Eq. 1 of DGQ: x_q = clamp(round(x / s) + z, qmin, qmax), x_dq = s (x_q - z)."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def log2_quantize(x: Tensor, scale: Tensor, levels: int) -> Tensor:
    """Eq. 2 of DGQ: x_q = clamp(round(-log2(x / s)), 0, 2^b - 1), x_dq = s 2^(-x_q)."""
    xf = x.float().clamp_min(TINY)
    q = torch.clamp(torch.round(-torch.log2(xf / scale)), 0, levels - 1)
    return (scale * torch.exp2(-q)).to(x.dtype)


def asymmetric_params(lo: Tensor, hi: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point mapping [lo, hi] onto [qmin, qmax]; the range is widened to hold 0
    exactly (padding, ReLU zeros) and the scale kept above a floor (a constant tensor)."""
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def dynamic_params(x: Tensor, qmin: int, qmax: int, per_token: bool, field: str) -> Tensor:
    """LiteVAR's dynamic min-max: the asymmetric scale or zero point of ``x`` per token (last axis
    reduced, kept as size 1) or per tensor, from the values themselves."""
    xf = x.float()
    lo, hi = (xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)) if per_token else (xf.amin(), xf.amax())
    scale, zero_point = asymmetric_params(lo, hi, qmin, qmax)
    return scale if field == "scale" else zero_point


def timestep_row(table: Tensor, timesteps: Tensor, timestep: Tensor) -> Tensor:
    """Row of ``table`` for the calibrated timestep nearest to ``timestep`` (its first element)."""
    t = timestep.reshape(-1)[0].to(timesteps.dtype)
    row = torch.argmin((timesteps - t).abs()).reshape(1)
    return torch.index_select(table, 0, row)[0]  # a tensor index, never .item(): compilers trace it


def _quantize_input(x: Tensor, scale: Tensor | None, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    if scale is None:
        return x
    if zero_point is None:
        zero_point = torch.zeros_like(scale)
    return uniform_quantize(x, scale, zero_point, qmin, qmax)


def _dequantize_weight(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (integer_codes(weight).float() * weight_scale.reshape(shape)).to(dtype)


def linear_reference(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    input_zero_point: Tensor | None,
    input_qmin: int,
    input_qmax: int,
) -> Tensor:
    """y = Q(x) Ŵᵀ + b with integer weights (symmetric, one scale per output channel)."""
    xq = _quantize_input(x, input_scale, input_zero_point, input_qmin, input_qmax)
    return F.linear(xq, _dequantize_weight(weight, weight_scale, x.dtype), bias)


def conv2d_reference(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    input_zero_point: Tensor | None,
    input_qmin: int,
    input_qmax: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """2-D convolution of Q(x) with integer weights (symmetric, one scale per output channel)."""
    xq = _quantize_input(x, input_scale, input_zero_point, input_qmin, input_qmax)
    w = _dequantize_weight(weight, weight_scale, x.dtype)
    return F.conv2d(xq, w, bias, stride, padding, dilation, groups)


def attention_probs(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float,
                    window_widths: Tensor | None = None, window_lengths: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale + mask) in float32, with SDPA's mask conventions (bool: keep where True),
    and -inf outside the windows where they are given (MDWA)."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    if window_widths is not None:
        keep = window_keep(q.shape[-2], k.shape[-2], window_widths, window_lengths)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)


def quantize_probs(
    probs: Tensor,
    scale: Tensor | None,
    zero_point: Tensor | None,
    scheme: str,
    qmin: int,
    qmax: int,
    start_token: int,
    dynamic_scale: bool,
) -> Tensor:
    """Quantize attention probabilities; DGQ eq. 8-9 when ``start_token`` >= 0 and scheme is log2.

    The start-token column (index ``start_token`` along the key axis) stays in full precision;
    the other columns are quantized with the static ``scale`` or, with ``dynamic_scale``, from
    s = max(A[:, others]) computed here, one scalar per tensor as in the paper: log2 codes count
    halvings below s (eq. 8), a uniform grid spans [0, s] with zero at ``qmin``.
    """
    if scheme == "none":
        return probs
    keep = None
    if start_token >= 0:
        keep = probs[..., start_token : start_token + 1]
        probs = torch.cat([probs[..., :start_token], probs[..., start_token + 1 :]], dim=-1)
    if dynamic_scale:
        scale, zero_point = probs_params(probs.amax(), scheme, qmin, qmax)
    if scale is None:
        raise ValueError("static probability quantization needs a scale")
    if scheme == "log2":
        out = log2_quantize(probs, scale, qmax + 1)
    else:
        out = uniform_quantize(probs, scale, zero_point if zero_point is not None else torch.zeros_like(scale), qmin, qmax)
    if keep is not None:
        out = torch.cat([out[..., :start_token], keep, out[..., start_token:]], dim=-1)
    return out


def probs_peak(probs: Tensor, start_token: int) -> Tensor:
    """The largest probability outside the start-token column: what a dynamic scale spans."""
    if start_token >= 0:  # probabilities are >= 0: a zero never raises the peak
        probs = probs.masked_fill(torch.arange(probs.shape[-1], device=probs.device) == start_token, 0.0)
    return probs.amax()


def probs_params(peak: Tensor, scheme: str, qmin: int, qmax: int) -> tuple[Tensor, Tensor | None]:
    """The (scale, zero point) of a dynamic probability grid spanning [0, ``peak``] (DGQ eq. 8)."""
    peak = peak.clamp_min(TINY).reshape(())
    if scheme == "log2":
        return peak, None
    return peak / (qmax - qmin), torch.full_like(peak, float(qmin))


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    probs_scale: Tensor | None,
    probs_zero_point: Tensor | None,
    probs_scheme: str,
    probs_qmin: int,
    probs_qmax: int,
    start_token: int,
    dynamic_scale: bool,
    window_widths: Tensor | None = None,
    window_lengths: Tensor | None = None,
    shared_half: int = -1,
) -> Tensor:
    """softmax(q kᵀ · scale + mask) V with the probabilities quantized (scheme "none" keeps them),
    within the windows where they are given; for one half of the batch only, given to both, when
    ``shared_half`` is 0 or 1 (CFG sharing).

    q, k, v are (..., heads, tokens, head_dim) as for SDPA; they arrive already quantized by
    their own fake_quant nodes when the recipe quantizes them.
    """

    def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        probs = attention_probs(q, k, attn_mask, scale, window_widths, window_lengths)
        probs = quantize_probs(probs, probs_scale, probs_zero_point, probs_scheme, probs_qmin, probs_qmax, start_token, dynamic_scale)
        return torch.matmul(probs.to(v.dtype), v)

    return on_shared_half(shared_half, (q, k, v, attn_mask), attend)


def on_shared_half(shared_half: int, operands: Sequence[Tensor | None], compute: Callable[..., Tensor]) -> Tensor:
    """``compute(*operands)``; with CFG sharing (``shared_half`` 0 or 1), ``compute`` of that half of the
    batch, given to both halves. The first operand's and the output's leading dimension is the batch."""
    if shared_half < 0:
        return compute(*operands)
    batch = operands[0].shape[0]
    if batch % 2:
        raise ValueError(f"attention shared across CFG needs a batch of two halves; got a batch of {batch}")
    out = compute(*(batch_half(t, batch, shared_half) for t in operands))
    return torch.cat([out, out])


def batch_half(t: Tensor | None, batch: int, half: int) -> Tensor | None:
    """Half ``half`` of a CFG batch of ``batch`` samples: ``t``'s own half where its leading dimension is
    the batch, ``t`` itself where it broadcasts (a mask or keys shared by every sample)."""
    if t is None or t.dim() == 0 or t.shape[0] != batch:
        return t
    n = batch // 2
    return t[half * n : (half + 1) * n]


def _select_timestep(table: Tensor, timesteps: Tensor, timestep: Tensor) -> Tensor:
    """Per-step quantization (DGQ eq. 7, TFMQ-DM) stores one parameter row per calibrated step;
    the graph picks the row from the step input it receives, so the quantized module works inside
    a diffusers pipeline's own denoising loop. (A copy: an op's output may not alias its input.)"""
    return timestep_row(table, timesteps, timestep).clone()


# The plain-PyTorch body of each op, called with the op's arguments by name: what a lowering inlines
# where it has nothing faster, so that its compiler (inductor) fuses the reference arithmetic.
REFERENCES: dict[object, Callable[..., Tensor]] = {}


def _define(schema: type[OpSchema], reference: Callable[..., Tensor], body: Callable[..., Tensor] | None = None) -> None:
    """Register ``lowbit::<NAME>`` running ``body`` (default: the reference), and file its reference."""
    schema.define(f"lowbit::{schema.NAME}", body or reference)
    REFERENCES[schema.overload()] = reference


_define(FakeQuant, uniform_quantize)
_define(Log2FakeQuant, log2_quantize)
_define(DynamicParams, dynamic_params)
_define(SelectTimestep, timestep_row, _select_timestep)
_define(QuantizedLinear, linear_reference)
_define(QuantizedConv2d, conv2d_reference)
_define(QuantizedAttention, attention_reference)
