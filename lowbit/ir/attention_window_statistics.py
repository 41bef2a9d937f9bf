"""The geometry of LiteVAR's multi-diagonal windows, and the attention mass they hold, streamed.

A VAR step's queries are the s_k² tokens of the current scale; its keys are the tokens of every
scale so far (the KV cache), so the key axis falls into *parts*, one per scale (LiteVAR §2). Each
part is a grid of rows × columns of tokens in raster order, and so are the queries: the last
part's grid when it holds as many tokens as there are queries (a step's own scale, or
self-attention over one image), else one row. Along each axis, query index a of n_q and key index
b of n_p sit at distance d = |a·n_p/n_q − b|, kept as an integer *bucket*
floor(d) = |a·n_p − b·n_q| // n_q (exact in integers, so "d < w" is "bucket < w" for an integer
width w, and the statistics and the mask agree to the last element); an entry's bucket is the
larger of its two axes' (a square window, Chebyshev distance).

Two geometries give the parts their grids (``GEOMETRIES``): "band" makes every part one row of
its tokens — LiteVAR's official band on flattened indices, |i·n_p/n_q − j| < w — and "grid"
makes a part of s² tokens an s × s grid (VAR's scales, a square image's patches; other parts stay
one row), so a window is the 2-D neighbourhood of the query's position in that scale, as
DiTFastAttn windows a DiT's image. ``lengths`` arguments are the parts' token counts (P,) — one
row each — or their grids (P, 2) of (rows, columns).

``WindowMass`` accumulates, per head and part, the attention mass in each distance bucket, summed
over the batch and the queries: a window search needs nothing else (R_w = mass below w / mass of
the part), and its memory is heads × parts × the longest side, whatever the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GEOMETRIES", "WindowMass", "image_keys", "key_columns", "key_parts", "part_grids", "part_tokens", "query_grid",
           "tile_sizes", "window_buckets", "window_keep", "window_kept", "window_tiles"]

GEOMETRIES = ("band", "grid")


def key_parts(queries: int, keys: int, step_tokens: tuple[int, ...] | None) -> tuple[int, ...]:
    """The part lengths of an attention call's key axis: the scales of ``step_tokens`` (tokens each
    step adds to the cache) when the call is step s of them (queries = step_tokens[s], keys = their
    sum up to s), else one part holding every key."""
    if step_tokens:
        total = 0
        for s, tokens in enumerate(step_tokens):
            total += tokens
            if tokens == queries and total == keys:
                return tuple(step_tokens[: s + 1])
    return (keys,)


def image_keys(lengths: tuple[int, ...], queries: int) -> bool:
    """Whether a call's keys are image tokens, which windows may drop: a step's scales, or the queries'
    own tokens (self-attention). A single part of other keys is a text prompt (cross-attention),
    which has no position near a query's: windows keep it whole (DiTFastAttn windows self-attention
    only)."""
    return len(lengths) > 1 or lengths[0] == queries


def part_grids(lengths: tuple[int, ...], geometry: str, queries: int) -> tuple[tuple[int, int], ...]:
    """The (rows, columns) of parts of ``lengths`` tokens under ``geometry``: one row ("band"), or s × s
    for s² image tokens ("grid"); text keys stay one row, whatever their length."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"window geometry must be one of {GEOMETRIES}, got {geometry!r}")
    image = image_keys(lengths, queries)
    side = [math.isqrt(n) for n in lengths]
    return tuple((s, s) if geometry == "grid" and image and s * s == n else (1, n) for s, n in zip(side, lengths))


def _grids(lengths: Tensor) -> Tensor:
    """(P, 2) rows and columns of each part, from token counts (P,) (one row each) or grids (P, 2)."""
    lengths = lengths.to(torch.int64)
    return lengths if lengths.dim() == 2 else torch.stack([torch.ones_like(lengths), lengths], 1)


def part_tokens(lengths: Tensor) -> Tensor:
    """(P,) tokens of each part, from token counts or grids."""
    return _grids(lengths).prod(-1)


def query_grid(queries: int, lengths: Tensor) -> Tensor:
    """(2,) the queries' rows and columns: the last non-empty part's grid when it holds ``queries``
    tokens, else one row (tensor arithmetic, so a traced graph computes it)."""
    grids = _grids(lengths)
    tokens = grids.prod(-1)
    last = grids[((tokens > 0).sum() - 1).clamp_min(0)]
    one_row = torch.stack([torch.ones_like(last[0]), torch.full_like(last[0], queries)])
    return torch.where(last.prod() == queries, last, one_row)


def key_columns(keys: int, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per key column (keys,): its part (P past the parts), its row and column in that part's grid, and
    the part's rows and columns."""
    grids = _grids(lengths)
    tokens = grids.prod(-1)
    ends = torch.cumsum(tokens, 0)
    j = torch.arange(keys, device=grids.device)
    part = (j[:, None] >= ends[None, :]).sum(1)
    inside = part.clamp_max(tokens.numel() - 1)
    jj = j - (ends - tokens)[inside]
    rows, cols = grids[inside, 0], grids[inside, 1].clamp_min(1)
    return part, torch.div(jj, cols, rounding_mode="floor"), jj % cols, rows, cols


def window_buckets(queries: int, keys: int, lengths: Tensor, query_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(part of each key column (keys,), distance bucket of each entry (queries, keys)).

    ``lengths``: the parts' token counts or grids (trailing empty parts allowed); key columns past
    them get part index P. ``query_ids`` picks some query rows only (default: all). Tensor
    arithmetic only, so that a traced graph computes it for any shape.
    """
    part, key_row, key_col, rows, cols = key_columns(keys, lengths)
    q_rows, q_cols = query_grid(queries, lengths)
    i = torch.arange(queries, device=part.device) if query_ids is None else query_ids.to(part.device)
    axes = [(torch.div(i, q_cols, rounding_mode="floor"), key_row, rows, q_rows), (i % q_cols, key_col, cols, q_cols)]
    row_bucket, col_bucket = (torch.div((a[:, None] * n[None, :] - b[None, :] * m).abs(), m, rounding_mode="floor")
                              for a, b, n, m in axes)
    return part, torch.maximum(row_bucket, col_bucket)


def window_keep(queries: int, keys: int, widths: Tensor, lengths: Tensor, query_ids: Tensor | None = None) -> Tensor:
    """(heads, queries, keys) bool, True where the windows keep an entry: part p of head h keeps the
    entries of bucket < widths[h, p]; a negative width keeps the whole part, and so do columns past
    the parts. ``query_ids`` picks some query rows only (default: all)."""
    part, bucket = window_buckets(queries, keys, lengths, query_ids)
    parts = widths.shape[-1]
    w = widths.to(torch.int64)[:, part.clamp_max(parts - 1)]  # (heads, keys)
    return (w[:, None, :] < 0) | (bucket[None] < w[:, None, :]) | (part >= parts)[None, None, :]


def _axis_interval(ids: Tensor, n: int, widths: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Along one axis of n keys and m queries, the keys b each query a keeps, as (lo, hi) (heads,
    len(ids)), empty where lo > hi: |a·n − b·m| < w·m is b in [⌊(a·n − w·m)/m⌋ + 1, ⌈(a·n + w·m)/m⌉ − 1];
    a negative width keeps [0, n − 1]. Both ends are non-decreasing in a."""
    w, a = widths[:, None], ids[None, :]
    lo = torch.div(a * n - w * m, m, rounding_mode="floor") + 1
    hi = -torch.div(-(a * n + w * m), m, rounding_mode="floor") - 1
    return torch.where(w < 0, 0, lo.clamp_min(0)), torch.where(w < 0, n - 1, hi.clamp_max(n - 1))


def _parts(widths: Tensor, lengths: Tensor, keys: int) -> list[tuple[int, int, int, Tensor]]:
    """(offset, rows, columns, widths (heads,)) of each non-empty part, and of the columns past them (one
    row, kept whole)."""
    widths, grids = widths.to("cpu", torch.int64), _grids(lengths.to("cpu"))
    tokens = grids.prod(-1)
    offsets = (torch.cumsum(tokens, 0) - tokens).tolist()
    parts = [(o, r, c, widths[:, p]) for p, (o, (r, c)) in enumerate(zip(offsets, grids.tolist())) if r * c > 0]
    rest = int(tokens.sum())
    if rest < keys:
        parts.append((rest, 1, keys - rest, torch.full((widths.shape[0],), -1)))
    return parts


def window_kept(queries: int, keys: int, widths: Tensor, lengths: Tensor) -> Tensor:
    """Entries the windows keep per head (heads,), without the (queries, keys) mask: a query keeps, in
    each part, the product of its two axes' kept intervals, so the total is a product of sums."""
    q_rows, q_cols = query_grid(queries, lengths.to("cpu")).tolist()
    kept = torch.zeros(widths.shape[0], dtype=torch.int64)
    for _, rows, cols, w in _parts(widths, lengths, keys):
        per_axis = []
        for n, m in ((rows, q_rows), (cols, q_cols)):
            lo, hi = _axis_interval(torch.arange(m), n, w, m)
            per_axis.append((hi - lo + 1).clamp_min(0).sum(1))
        kept += per_axis[0] * per_axis[1]
    return kept


_CHUNK_ENTRIES = 1 << 24  # mask entries evaluated at once where no closed form counts the tiles


def window_tiles(queries: int, keys: int, widths: Tensor, lengths: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """(touched, full) bool (heads, query tiles, key tiles) of ``tile`` x ``tile`` tiles over the
    flattened indices: a tile is touched when it holds a kept entry, full when it holds nothing else."""
    q_rows, _ = query_grid(queries, lengths.to("cpu")).tolist()
    if q_rows == 1 and all(rows == 1 for _, rows, _, _ in _parts(widths, lengths, keys)):
        return _band_tiles(queries, keys, widths, lengths, tile)
    rows, cols = -(-queries // tile), -(-keys // tile)
    step = max(1, _CHUNK_ENTRIES // (widths.shape[0] * tile * keys))  # tile rows evaluated at once
    kept = []
    for first in range(0, rows, step):
        ids = torch.arange(first * tile, min((first + step) * tile, queries))
        keep = window_keep(queries, keys, widths, lengths, ids)
        padded = torch.nn.functional.pad(keep, (0, cols * tile - keys, 0, -(-len(ids) // tile) * tile - len(ids)))
        kept.append(padded.reshape(widths.shape[0], -1, tile, cols, tile).sum((2, 4)))
    count = torch.cat(kept, 1)
    return count > 0, count == tile_sizes(queries, tile)[:, None] * tile_sizes(keys, tile)[None, :]


def tile_sizes(length: int, tile: int) -> Tensor:
    """How many of ``length`` indices each ``tile``-wide tile holds (the last one may hold fewer)."""
    return (length - torch.arange(-(-length // tile)) * tile).clamp_max(tile)


def _band_tiles(queries: int, keys: int, widths: Tensor, lengths: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """``window_tiles`` when every part is one row, in closed form (a 2K VAR step has 7·10⁸ entries per
    head): over a tile's query rows the kept intervals of a part span [lo(first row), hi(last row)]
    (touched; at worst one tile more when a part is longer than the queries, which the mask still
    masks) and all hold [lo(last row), hi(first row)] (full: every valid row keeps every valid column)."""
    rows, cols = -(-queries // tile), -(-keys // tile)
    first = torch.arange(rows) * tile
    last = (first + tile).clamp_max(queries) - 1
    col_first = torch.arange(cols) * tile
    col_last = (col_first + tile).clamp_max(keys) - 1
    touched = torch.zeros(widths.shape[0], rows, cols, dtype=torch.bool)
    covered = torch.zeros(widths.shape[0], rows, cols, dtype=torch.int64)
    for offset, _, n, w in _parts(widths, lengths, keys):
        c = slice(offset // tile, (offset + n - 1) // tile + 1)
        c0, c1 = col_first[c], col_last[c]
        (lo_first, hi_first), (lo_last, hi_last) = (
            tuple(offset + e[..., None] for e in _axis_interval(r, n, w, queries)) for r in (first, last))
        touched[..., c] |= torch.maximum(lo_first, c0) <= torch.minimum(hi_last, c1)
        covered[..., c] += (torch.minimum(hi_first, c1) - torch.maximum(lo_last, c0) + 1).clamp_min(0)
    return touched, covered == (col_last - col_first + 1)


@dataclass
class WindowMass:
    """Attention mass per head, part and distance bucket (``mass`` (H, P, D) float64), summed over
    ``rows`` query rows of every call seen at one step (``queries`` each, keys in parts ``lengths``:
    token counts, or (rows, columns) grids under the "grid" geometry)."""

    lengths: tuple
    queries: int
    mass: Tensor
    rows: int

    @classmethod
    def of(cls, probs: Tensor, step_tokens: tuple[int, ...] | None, geometry: str = "band") -> WindowMass:
        """From probabilities (batch, [heads,] queries, keys)."""
        if probs.dim() not in (3, 4):
            raise ValueError(f"window statistics take probabilities (batch, [heads,] queries, keys); got shape {tuple(probs.shape)}")
        if probs.dim() == 3:
            probs = probs[:, None]
        b, h, nq, nk = probs.shape
        lengths = key_parts(nq, nk, step_tokens)
        if geometry != "band":
            lengths = part_grids(lengths, geometry, nq)
        table = torch.tensor(lengths, device=probs.device)
        part, bucket = window_buckets(nq, nk, table)
        depth = int(_grids(table).max()) + 1  # buckets stay below the longest side
        index = (part[None, :] * depth + bucket.clamp_max(depth - 1)).reshape(-1)
        summed = probs.detach().double().sum(0).reshape(h, -1)
        mass = torch.zeros(h, len(lengths) * depth, dtype=torch.float64, device=probs.device)
        mass.index_add_(1, index, summed)
        return cls(lengths, nq, mass.reshape(h, len(lengths), depth).cpu(), b * nq)

    def merge(self, other: WindowMass) -> WindowMass:
        if (other.lengths, other.queries) != (self.lengths, self.queries):
            raise ValueError(f"one step's attention calls disagree on their shape: {self.queries} queries and key parts "
                             f"{self.lengths}, then {other.queries} and {other.lengths}")
        return WindowMass(self.lengths, self.queries, self.mass + other.mass, self.rows + other.rows)

    device = None  # a few numbers on the CPU, wherever the model runs

    def to(self, device: torch.device | str) -> WindowMass:
        return self

    def nbytes(self) -> int:
        return self.mass.numel() * 8
