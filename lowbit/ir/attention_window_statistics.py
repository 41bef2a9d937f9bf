"""The geometry of LiteVAR's multi-diagonal windows, and the attention mass they hold, streamed.

A VAR step's queries are the s_k² tokens of the current scale; its keys are the tokens of every
scale so far (the KV cache), so the key axis falls into *parts*, one per scale, of ``lengths``
tokens each (LiteVAR §2). Within part p, of n_p keys, query i sits at relative position
i·n_p/n_q and key j (index jj within the part) at distance d = |i·n_p/n_q − jj| from it (the
official code's band on flattened indices). Distances are kept as integer *buckets*
floor(d) = |i·n_p − jj·n_q| // n_q, exact in integers, so that "d < w" is "bucket < w" for an
integer width w, and the statistics and the mask agree to the last element.

``WindowMass`` accumulates, per head and part, the attention mass in each distance bucket, summed
over the batch and the queries: a window search needs nothing else (R_w = mass below w / mass of
the part), and its memory is heads × parts × the longest part, whatever the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["WindowMass", "key_parts", "window_buckets", "window_keep"]


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


def window_buckets(queries: int, keys: int, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(part of each key column (keys,), distance bucket of each entry (queries, keys)).

    ``lengths`` (P,) are the parts' lengths (trailing zeros allowed); key columns past their sum
    get part index P. Tensor arithmetic only, so that a traced graph computes it for any shape.
    """
    lengths = lengths.to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    j = torch.arange(keys, device=lengths.device)
    part = (j[:, None] >= ends[None, :]).sum(1)
    inside = part.clamp_max(lengths.numel() - 1)
    n = lengths[inside]
    jj = j - (ends - lengths)[inside]
    i = torch.arange(queries, device=lengths.device)
    bucket = torch.div((i[:, None] * n[None, :] - jj[None, :] * queries).abs(), queries, rounding_mode="floor")
    return part, bucket


def window_keep(queries: int, keys: int, widths: Tensor, lengths: Tensor) -> Tensor:
    """(heads, queries, keys) bool, True where the windows keep an entry: part p of head h keeps the
    band bucket < widths[h, p]; a negative width keeps the whole part, and so do columns past the parts."""
    part, bucket = window_buckets(queries, keys, lengths)
    parts = widths.shape[-1]
    w = widths.to(torch.int64)[:, part.clamp_max(parts - 1)]  # (heads, keys)
    return (w[:, None, :] < 0) | (bucket[None] < w[:, None, :]) | (part >= parts)[None, None, :]


@dataclass
class WindowMass:
    """Attention mass per head, part and distance bucket (``mass`` (H, P, D) float64), summed over
    ``rows`` query rows of every call seen at one step (``queries`` each, keys in parts ``lengths``)."""

    lengths: tuple[int, ...]
    queries: int
    mass: Tensor
    rows: int

    @classmethod
    def of(cls, probs: Tensor, step_tokens: tuple[int, ...] | None) -> WindowMass:
        """From probabilities (batch, [heads,] queries, keys)."""
        if probs.dim() not in (3, 4):
            raise ValueError(f"window statistics take probabilities (batch, [heads,] queries, keys); got shape {tuple(probs.shape)}")
        if probs.dim() == 3:
            probs = probs[:, None]
        b, h, nq, nk = probs.shape
        lengths = key_parts(nq, nk, step_tokens)
        part, bucket = window_buckets(nq, nk, torch.tensor(lengths, device=probs.device))
        depth = max(lengths) + 1
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
