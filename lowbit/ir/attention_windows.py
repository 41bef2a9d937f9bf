"""LiteVAR's multi-diagonal window attention (MDWA, §2): the windows calibration chose, per layer,
step, head and key part.

For every attention layer, step and head, each part of the key axis (one per earlier scale of a VAR
step, see ``lowbit.ir.attention_window_statistics``) gets the narrowest window width w ≥ 1 whose
window (a band on flattened indices, or a square on the part's 2-D grid) holds at least a ratio R0
of the part's attention mass over the calibration samples (R_w ≥ R0). The first ``full_parts``
parts stay whole (LiteVAR keeps scales 1-3: attention sinks sit there, and they cost little), and
so do text keys (cross-attention); R0 = 1 keeps every entry. A width of -1 keeps a whole part; so
does any window as wide as its part. The windows are an artifact, saved with the model;
``convert_to_quantized_ops`` gives each attention op its step's row, and every target realises
the same mask (``window_keep``): -inf before the softmax in the eager reference and on the HTP,
skipped blocks in FlexAttention.

What is saved is counted two ways, as the fraction of attention score entries (QKᵀ and PV work
alike) never needed: from the element mask (what LiteVAR reports) and from the block mask a
block-sparse kernel with a given tile really skips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.artifacts import Artifact
from lowbit.ir.attention_window_statistics import (WindowMass, image_keys, part_tokens, tile_sizes, window_buckets,
                                                  window_keep, window_kept, window_tiles)

__all__ = ["ATTENTION_WINDOWS", "WINDOW_BLOCK", "AttentionWindows", "mass_target"]

ATTENTION_WINDOWS = "attention_windows"  # the artifact's name in the pass context
WINDOW_BLOCK = 16  # the tile (queries x keys) of the CPU block-sparse lowering: small maps, small tiles


def mass_target(layer: str) -> str:
    """Where calibration files a layer's WindowMass in the ObservationStore."""
    return f"{layer}:window_mass"


def _width(mass: Tensor, ratio: float, widest: int) -> int:
    """The narrowest w >= 1 whose buckets below w hold ``ratio`` of ``mass`` (D,); -1 when that band
    spans the whole part (``widest`` is its largest bucket)."""
    if ratio >= 1.0:
        return -1
    cumulative = torch.cumsum(mass, 0)
    w = max(1, int((cumulative < ratio * float(mass.sum())).sum()) + 1)
    return -1 if w > widest else w


@dataclass(frozen=True)
class AttentionWindows(Artifact):
    """``widths[l, s, h, p]``: the window width of layer l's head h in key part p at step s (-1: whole);
    ``lengths[l, s]`` the parts' token counts (band windows) or (rows, columns) grids (2-D windows),
    zero-padded; ``queries[l, s]`` the query count (0: the layer was not called at that step)."""

    KIND = "attention_windows"

    layers: tuple[str, ...]
    ratio: float
    full_parts: int
    steps: Tensor
    queries: Tensor
    lengths: Tensor
    widths: Tensor

    def __post_init__(self) -> None:
        layers, steps = len(self.layers), self.steps.numel()
        if (tuple(self.queries.shape) != (layers, steps) or tuple(self.lengths.shape[:2]) != (layers, steps)
                or tuple(self.widths.shape[:2]) != (layers, steps) or self.widths.shape[-1] != self.lengths.shape[2]):
            raise ValueError(f"attention windows for {layers} layers and {steps} steps do not fit queries "
                             f"{tuple(self.queries.shape)}, lengths {tuple(self.lengths.shape)}, widths {tuple(self.widths.shape)}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"the window ratio R0 must be in (0, 1], got {self.ratio}")

    @classmethod
    def decide(cls, measured: dict[str, dict[float, WindowMass]], ratio: float, full_parts: int) -> AttentionWindows:
        """Each layer's, step's, head's and part's narrowest band holding ``ratio`` of the part's mass."""
        layers = sorted(measured)
        steps = sorted({t for per_step in measured.values() for t in per_step})
        stats = [[measured[layer].get(t) for t in steps] for layer in layers]
        present = [m for row in stats for m in row if m is not None]
        parts = max((len(m.lengths) for m in present), default=1)
        heads = max((m.mass.shape[0] for m in present), default=1)
        queries = torch.zeros(len(layers), len(steps), dtype=torch.int64)
        grid = next((torch.tensor(m.lengths).shape[1:] for m in present), ())  # (2,) for 2-D windows
        lengths = torch.zeros(len(layers), len(steps), parts, *grid, dtype=torch.int64)
        widths = torch.full((len(layers), len(steps), heads, parts), -1, dtype=torch.int64)
        for l, row in enumerate(stats):
            for s, m in enumerate(row):
                if m is None:
                    continue
                queries[l, s], lengths[l, s, : len(m.lengths)] = m.queries, torch.tensor(m.lengths)
                table = torch.tensor(m.lengths)
                part, bucket = window_buckets(m.queries, int(part_tokens(table).sum()), table)
                if not image_keys(tuple(int(n) for n in part_tokens(table)), m.queries):
                    continue  # text keys (cross-attention) stay whole
                for p in range(full_parts, len(m.lengths)):
                    widest = int(bucket[:, part == p].max())
                    for h in range(m.mass.shape[0]):
                        widths[l, s, h, p] = _width(m.mass[h, p], ratio, widest)
        return cls(tuple(layers), float(ratio), int(full_parts), torch.tensor(steps, dtype=torch.float64), queries, lengths, widths)

    def tables(self, layer: str) -> tuple[Tensor, Tensor] | None:
        """(widths (steps, heads, parts), lengths (steps, parts)) of ``layer``; None if it has no windows."""
        if layer not in self.layers:
            return None
        i = self.layers.index(layer)
        return self.widths[i], self.lengths[i]

    def keep(self, layer: int, step: int) -> Tensor:
        """The (heads, queries, keys) mask of one layer at one step."""
        lengths = self.lengths[layer, step]
        return window_keep(int(self.queries[layer, step]), int(part_tokens(lengths).sum()), self.widths[layer, step], lengths)

    def entries(self, block: int | None = None) -> tuple[Tensor, Tensor]:
        """(kept, total) attention score entries of one sample per layer and step (layers, steps), heads
        summed: from the element mask (``block`` None) or counting every entry of each ``block`` x
        ``block`` tile that holds a kept one (what a block-sparse kernel computes)."""
        kept = torch.zeros(len(self.layers), self.steps.numel(), dtype=torch.float64)
        total = torch.zeros_like(kept)
        for l in range(len(self.layers)):
            for s in range(self.steps.numel()):
                queries, lengths, widths = int(self.queries[l, s]), self.lengths[l, s], self.widths[l, s]
                keys = int(part_tokens(lengths).sum())
                total[l, s] = widths.shape[0] * queries * keys
                if block is None:
                    kept[l, s] = int(window_kept(queries, keys, widths, lengths).sum())
                elif queries:
                    touched, _ = window_tiles(queries, keys, widths, lengths, block)
                    sizes = tile_sizes(queries, block)[:, None] * tile_sizes(keys, block)[None, :]
                    kept[l, s] = int((touched * sizes).sum())
        return kept, total

    def saved(self, block: int | None = None) -> float:
        """The fraction of one image's attention score entries (every layer, step and head) skipped."""
        kept, total = self.entries(block)
        return float(1.0 - kept.sum() / total.sum().clamp_min(1.0))
