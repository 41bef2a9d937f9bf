"""MDWA's windows as work really skipped, on every compile target.

A windowed ``quantized_attention`` whose probabilities stay in floating point becomes one opaque op,
``lowbit_windows::windowed_attention``. At run time it reads its step's windows (small tensors) and
computes only the tiles a window touches, in one of two block-sparse forms:

- on an AVX512 CPU, lowbit's C++ kernel (``csrc/windowed_attention.cpp``): an online-softmax loop
  over each block of query rows' touched key tiles, on ATen's float32 brgemm. It exists because
  FlexAttention's CPU kernel runs a tile 4× slower than SDPA's flash kernel here, so skipping 70–80%
  of the tiles did not make it faster than dense SDPA (``bench/windowed_attention.py``);
- elsewhere (CUDA, other CPUs), FlexAttention's kernel with the ``BlockMask`` of the windows.

Both build their tables once per (windows, shape, tile) and keep them: tiles outside every window
are never computed, tiles inside are computed unmasked, and only the tiles a window edge crosses
evaluate ``window_keep``'s arithmetic on the indices (``keep_intervals``: per key, the query rows
and columns that keep it). No L×L tensor exists at any point, here or in the tile count.

Why an opaque op around a separately compiled FlexAttention rather than FlexAttention inside the
inductor graph: in torch 2.13 on the CPU, the flex template miscompiles dynamic-shape graphs,
crashes when inductor fuses a pointwise consumer into it, and cannot read a mask computed in the
same graph (measured; README). Compiled alone, per static shape, it is exact. The linears around it
stay in the surrounding compiled graph.

Probabilities quantized on a grid (``probs_scheme`` uniform or log2) have no block-sparse form here
(neither kernel's softmax is quantized); those calls keep the reference arithmetic, and the
translation report says so.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lowbit.ir.attention_window_statistics import key_columns, query_grid, window_tiles
from lowbit.ir.attention_windows import WINDOW_BLOCK
from lowbit.ir.ops import attention_reference, on_shared_half
from lowbit.ir.schema import QuantizedAttention
from lowbit.lowering.native import native_built
from lowbit.lowering.shape_kernels import per_shape
from lowbit.lowering.translate import node_shape

__all__ = ["CPU_TILE", "GPU_TILE", "flex_kernel", "flex_windowed", "keep_intervals", "native_tile", "native_windowed",
           "native_windows", "tile_block_mask", "window_block_mask", "windowed_attention_form"]

CPU_TILE = WINDOW_BLOCK  # FlexAttention on the CPU: 16 was fastest, or within 5%, at VAR-d16's and 1024 px's steps
GPU_TILE = 128  # FlexAttention's own default on CUDA
_CACHED_STEPS = 256


def tile_block_mask(partial: Tensor, full: Tensor, tile: int, queries: int, keys: int,
                    mask_mod: Callable | None = None) -> BlockMask:
    """A ``BlockMask`` from bool (heads, query tiles, key tiles): ``partial`` tiles read ``mask_mod``,
    ``full`` tiles are computed unmasked, the rest skipped."""

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
        t = tiles[None].int()
        return t.sum(-1).int(), torch.argsort(t, dim=-1, descending=True, stable=True).int()

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(queries, keys), compute_q_blocks=False)  # q index: backward only


def window_block_mask(widths: Tensor, lengths: Tensor, queries: int, keys: int, tile: int,
                      device: torch.device | str = "cpu") -> BlockMask:
    """The ``BlockMask`` of the windows ``widths`` (heads, parts) over key parts ``lengths`` (token
    counts or grids), on ``device``: empty tiles skipped, full tiles unmasked, the rest masked exactly
    as ``window_keep`` does."""
    widths, lengths = widths.detach().to("cpu", torch.int64), lengths.detach().to("cpu", torch.int64)
    touched, full = window_tiles(queries, keys, widths, lengths, tile)
    mask_mod = _window_mask_mod(widths, lengths, queries, keys, device)
    return tile_block_mask(touched & ~full, full, tile, queries, keys, mask_mod).to(device)


def _query_interval(b: Tensor, n: Tensor, w: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Along one axis of n keys and m queries, the queries a that keep key b: |a·n − b·m| < w·m is a in
    [⌊(b − w)·m/n⌋ + 1, ⌈(b + w)·m/n⌉ − 1], clipped to [0, m − 1] (so padded queries keep nothing); a
    negative width keeps [0, m − 1]."""
    lo = torch.div((b - w) * m, n, rounding_mode="floor") + 1
    hi = -torch.div(-(b + w) * m, n, rounding_mode="floor") - 1
    return torch.where(w < 0, 0, lo.clamp_min(0)), torch.where(w < 0, m - 1, hi.clamp_max(m - 1))


def keep_intervals(widths: Tensor, lengths: Tensor, queries: int, keys: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``window_keep`` per key column: the query rows and columns that keep each key, (heads, keys) each
    (row_lo, row_hi, col_lo, col_hi), and the width of the queries' grid. Query i, at row i // q_cols and
    column i % q_cols, keeps key j iff both lie in j's intervals."""
    part, key_row, key_col, rows, cols = key_columns(keys, lengths)
    q_rows, q_cols = query_grid(queries, lengths).tolist()
    parts = widths.shape[-1]
    width = torch.where(part[None, :] < parts, widths[:, part.clamp_max(parts - 1)], -1)  # (heads, keys); -1 keeps
    return (*_query_interval(key_row, rows, width, q_rows), *_query_interval(key_col, cols, width, q_cols), q_cols)


def _window_mask_mod(widths: Tensor, lengths: Tensor, queries: int, keys: int, device: torch.device | str) -> Callable:
    """``window_keep`` as FlexAttention's mask function, from ``keep_intervals``' tables: two gathers and
    comparisons per entry for band windows (the queries are one row), four and a division for 2-D windows."""
    row_lo, row_hi, col_lo, col_hi, q_cols = keep_intervals(widths, lengths, queries, keys)
    if q_cols == queries:  # band windows: fold the row condition (query row 0 inside) into the column interval
        col_lo = torch.where((row_lo <= 0) & (row_hi >= 0), col_lo, queries).to(device)
        col_hi = col_hi.to(device)

        def mask_mod(b, h, q, k):
            kc = k.clamp(max=keys - 1)
            return (k < keys) & (q >= col_lo[h, kc]) & (q <= col_hi[h, kc])

        return mask_mod
    row_lo, row_hi, col_lo, col_hi = (t.to(device) for t in (row_lo, row_hi, col_lo, col_hi))

    def mask_mod(b, h, q, k):
        kc = k.clamp(max=keys - 1)
        r, c = q // q_cols, q % q_cols
        return (k < keys) & (r >= row_lo[h, kc]) & (r <= row_hi[h, kc]) & (c >= col_lo[h, kc]) & (c <= col_hi[h, kc])

    return mask_mod


def native_windows(widths: Tensor, lengths: Tensor, queries: int, keys: int, tile: int) -> tuple:
    """The windows as the C++ kernel reads them: int8 (heads, query tiles, key tiles) of 0 (skipped), 1
    (an edge: masked entry by entry), 2 (inside), then ``keep_intervals``' four tables as int32 and q_cols."""
    widths, lengths = widths.detach().to("cpu", torch.int64), lengths.detach().to("cpu", torch.int64)
    touched, full = window_tiles(queries, keys, widths, lengths, tile)
    kinds = (touched.to(torch.int8) + full.to(torch.int8)).contiguous()
    *tables, q_cols = keep_intervals(widths, lengths, queries, keys)
    return (kinds, *(t.to(torch.int32).contiguous() for t in tables), q_cols)


def _flex_call(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


flex_kernel = per_shape(_flex_call)
_tables: OrderedDict[tuple, object] = OrderedDict()


def _cached(build: Callable, widths: Tensor, lengths: Tensor, *shape) -> object:
    """``build(widths, lengths, *shape)``, kept for the next call of the same step (the windows are constants)."""
    key = (build.__name__, widths.cpu().numpy().tobytes(), tuple(widths.shape), lengths.cpu().numpy().tobytes(), *map(str, shape))
    if key not in _tables:
        _tables[key] = build(widths, lengths, *shape)
        if len(_tables) > _CACHED_STEPS:
            _tables.popitem(last=False)
    _tables.move_to_end(key)
    return _tables[key]


def flex_windowed(q: Tensor, k: Tensor, v: Tensor, scale: float, widths: Tensor, lengths: Tensor, tile: int) -> Tensor:
    """Windowed attention by FlexAttention's block-sparse kernel (any device)."""
    block_mask = _cached(window_block_mask, widths, lengths, q.shape[-2], k.shape[-2], tile, q.device)
    return flex_kernel(q, k, v, block_mask, scale).contiguous()  # flex's own layout is (b, q, h, d)


def native_tile(queries: int) -> int:
    """The C++ kernel's tile side: small tiles skip more, large ones run longer GEMMs. 16 at VAR-d16's
    256 queries, 32 at 4,096, 64 at 16,384 were the fastest, or within 5% of it
    (``bench/windowed_attention.py``)."""
    return min(64, max(16, 1 << max(queries // 128, 1).bit_length() - 1))


def native_windowed(q: Tensor, k: Tensor, v: Tensor, scale: float, widths: Tensor, lengths: Tensor, tile: int) -> Tensor:
    """Windowed attention by lowbit's C++ kernel (``csrc/windowed_attention.cpp``; CPU, float32 arithmetic)."""
    windows = _cached(native_windows, widths, lengths, q.shape[-2], k.shape[-2], tile)
    return torch.ops.lowbit_native.windowed_attention(q.float(), k.float(), v.float(), scale, *windows, tile).to(q.dtype)


@torch.library.custom_op("lowbit_windows::windowed_attention", mutates_args=())
def windowed_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window_widths: Tensor, window_lengths: Tensor,
                       shared_half: int, tile: int) -> Tensor:
    """softmax(q kᵀ · scale) V within the windows, (batch, heads, tokens, dim), the tiles outside them skipped:
    by lowbit's C++ kernel on an AVX512 CPU (tiles of ``native_tile``), else by FlexAttention with ``tile``²
    tiles; ``shared_half`` as ``quantized_attention``'s (CFG sharing)."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if bool((window_widths < 0).all()):  # a step with every part whole: nothing to skip
            return F.scaled_dot_product_attention(q, k, v, scale=scale).contiguous()  # as the fake output
        if q.device.type == "cpu" and native_built():
            return native_windowed(q, k, v, scale, window_widths, window_lengths, native_tile(q.shape[-2]))
        return flex_windowed(q, k, v, scale, window_widths, window_lengths, tile)

    return on_shared_half(shared_half, (q, k, v), attend)


@windowed_attention.register_fake
def _(q, k, v, scale, window_widths, window_lengths, shared_half, tile):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _block_sparse_form(tile: int) -> Callable:
    def run(**arguments) -> Tensor:
        op = QuantizedAttention(**arguments)
        return torch.ops.lowbit_windows.windowed_attention.default(op.q, op.k, op.v, op.scale, op.window_widths,
                                                                   op.window_lengths, op.shared_half, tile)

    return run


def windowed_attention_form(node: torch.fx.Node, tile: int) -> tuple[Callable, str | None] | None:
    """The block-sparse form of a windowed attention node (FlexAttention's tiles ``tile``²), the reference with the
    reason it has none, or None when the node has no windows (the target decides)."""
    op = QuantizedAttention.of(node)
    if not op.windowed:
        return None
    if op.quantizes_probs:
        return attention_reference, f"windows with {op.probs_scheme}-quantized probabilities: the block-sparse kernels' softmax is not quantized"
    if op.attn_mask is not None:
        return attention_reference, "windows and an attention mask: the block-sparse form takes the windows only"
    rank = len(node_shape(op.q) or ())
    if rank != 4:
        return attention_reference, f"windows on q of rank {rank}: the block-sparse form takes (batch, heads, tokens, dim)"
    return _block_sparse_form(tile), None
