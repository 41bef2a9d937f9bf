"""Quantized attention on the CPU in query tiles: the probability matrix never exists whole.

The reference ``quantized_attention`` materialises softmax(q kᵀ) for every sample, head, query and
key in order to quantize it: 128 MiB at 1,024 tokens, 16 heads and a batch of 2, 1 GiB for an
SD-1.x block at 4,096 tokens — more than the rest of a step holds (``bench/attention_cpu.py`` times
both). Where q, k, v and the probabilities are on static 8-bit grids the integer kernel runs instead
(:mod:`lowbit.lowering.integer_attention`); these tiles serve the rest. A query row's probabilities
depend on that row alone, so with
a static probability scale the op is the same op on tiles of query rows, concatenated. A dynamic
scale (DGQ eq. 8: one peak over the whole tensor) takes a first pass over the tiles for the peak
(scores and softmax reduced to their largest value, nothing written), then the tiles with that scale.

Each tile runs the reference arithmetic, compiled by inductor for the tile's static shape (the
softmax and the quantizer fused into one pass over the tile's scores), from an opaque op, so that
the surrounding graph may keep dynamic token counts (VAR) and one kernel serves every tile of a
shape. Probabilities kept in floating point need no tiles: they run SDPA's flash kernel. Windows
(MDWA) on quantized probabilities keep the whole reference: their mask depends on the query's place
in the whole step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from lowbit.ir.ops import attention_probs, attention_reference, on_shared_half, probs_params, probs_peak
from lowbit.ir.schema import QuantizedAttention
from lowbit.lowering.integer_attention import integer_attention_form
from lowbit.lowering.shape_kernels import per_shape
from lowbit.lowering.translate import node_shape

__all__ = ["INLINE_SCORES", "TILE_SCORES", "tiled_attention", "tiled_attention_form"]

TILE_SCORES = 1 << 22  # scores per tile: 16 MiB of float32, a working set the last-level cache holds
INLINE_SCORES = 1 << 17  # at most this many scores, a call runs the reference inline (bench/attention_cpu.py)


def _tile(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, probs_scale: Tensor,
          probs_zero_point: Tensor | None, probs_scheme: str, probs_qmin: int, probs_qmax: int, start_token: int) -> Tensor:
    return attention_reference(q, k, v, attn_mask, scale, probs_scale, probs_zero_point, probs_scheme, probs_qmin,
                               probs_qmax, start_token, dynamic_scale=False)


def _peak(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float, start_token: int) -> Tensor:
    return probs_peak(attention_probs(q, k, attn_mask, scale), start_token)


_tile_kernel, _peak_kernel = per_shape(_tile), per_shape(_peak)


def _row_tiles(q: Tensor, k: Tensor, tile_scores: int) -> list[slice]:
    """Near-equal tiles of query rows holding at most ``tile_scores`` scores each (at least one row)."""
    queries = q.shape[-2]
    rows = max(1, tile_scores // max(1, math.prod(q.shape[:-2]) * k.shape[-2]))
    count = -(-queries // rows)
    rows = -(-queries // count)
    return [slice(start, min(start + rows, queries)) for start in range(0, queries, rows)]


def _mask_rows(attn_mask: Tensor | None, rows: slice, queries: int) -> Tensor | None:
    if attn_mask is None or attn_mask.dim() < 2 or attn_mask.shape[-2] != queries:
        return attn_mask  # broadcast along the queries
    return attn_mask[..., rows, :]


@torch.library.custom_op("lowbit_cpu::tiled_attention", mutates_args=())
def tiled_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, probs_scale: Tensor | None,
                    probs_zero_point: Tensor | None, probs_scheme: str, probs_qmin: int, probs_qmax: int, start_token: int,
                    dynamic_scale: bool, shared_half: int, tile_scores: int) -> Tensor:
    """``lowbit.quantized_attention`` (quantized probabilities, no windows) computed ``tile_scores``
    scores at a time."""

    def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        tiles = _row_tiles(q, k, tile_scores)
        k = k.transpose(-2, -1).contiguous().transpose(-2, -1)  # kᵀ laid out once, not copied again by every tile
        queries = q.shape[-2]
        probs = (probs_scale, probs_zero_point)
        if dynamic_scale:
            peak = torch.stack([_peak_kernel(q[..., rows, :], k, _mask_rows(attn_mask, rows, queries), scale, start_token)
                                for rows in tiles]).amax()
            probs = probs_params(peak, probs_scheme, probs_qmin, probs_qmax)
        return torch.cat([_tile_kernel(q[..., rows, :], k, v, _mask_rows(attn_mask, rows, queries), scale, *probs, probs_scheme,
                                       probs_qmin, probs_qmax, start_token) for rows in tiles], dim=-2)

    return on_shared_half(shared_half, (q, k, v, attn_mask), attend)


@tiled_attention.register_fake
def _(q, k, v, attn_mask, scale, probs_scale, probs_zero_point, probs_scheme, probs_qmin, probs_qmax, start_token,
      dynamic_scale, shared_half, tile_scores):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _float_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, shared_half: int = -1,
                     **unused) -> Tensor:
    """Probabilities in floating point: SDPA (the flash kernel; same mask conventions as the reference)."""
    return on_shared_half(shared_half, (q, k, v, attn_mask),
                          lambda q, k, v, attn_mask: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale))


def _tiled_form(tile_scores: int) -> Callable:
    def run(**arguments) -> Tensor:
        op = QuantizedAttention(**arguments)
        return torch.ops.lowbit_cpu.tiled_attention.default(
            op.q, op.k, op.v, op.attn_mask, op.scale, op.probs_scale, op.probs_zero_point, op.probs_scheme, op.probs_qmin,
            op.probs_qmax, op.start_token, op.dynamic_scale, op.shared_half, tile_scores)

    return run


def _scores(op: QuantizedAttention) -> int | None:
    """How many scores a call computes, where its shapes are static."""
    q, k = node_shape(op.q), node_shape(op.k)
    if q is None or k is None or not all(isinstance(d, int) for d in (*q, *k)):
        return None
    return math.prod(q[:-1]) * k[-2]


def tiled_attention_form(node: torch.fx.Node, tile_scores: int = TILE_SCORES) -> Callable:
    """The CPU form of an attention node without windows: SDPA for float probabilities; for quantized
    ones the reference arithmetic inline where the call is small (``INLINE_SCORES``: an opaque op's
    fixed cost would outweigh it), the integer kernel where it applies
    (:mod:`lowbit.lowering.integer_attention`), else query tiles (inline when one tile holds all)."""
    op = QuantizedAttention.of(node)
    if op.windowed:
        raise ValueError(f"node '{node.name}' has windows: use windowed_attention_form")
    if not op.quantizes_probs:
        return _float_attention
    scores = _scores(op)
    if scores is not None and scores <= INLINE_SCORES:
        return attention_reference
    form = integer_attention_form(node)  # decided last: where it applies, it rewrites the node's arguments
    if form is not None:
        return form
    return attention_reference if scores is not None and scores <= tile_scores else _tiled_form(tile_scores)
