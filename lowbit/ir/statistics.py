"""Streaming calibration statistics, keyed by quantization target and diffusion timestep.

Memory grows with channels + tokens, never with the number of samples seen, and ``merge`` is
associative and commutative (min, max and sums), so statistics gathered on several shards
(GPUs, processes) combine exactly into what one pass over all the data would have produced.

Layouts name where the channel axis of an observed tensor is:
- ``"channels_last"``: (batch, *tokens, C) — linear inputs, attention operands; tokens flattened.
- ``"channels_first"``: (batch, C, *pixels) — convolution inputs; pixels flattened.
For attention probabilities (batch, heads, queries, keys) the keys play the role of channels,
so the start-token column shows up as one "channel".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CalibrationError", "Layout", "ObservationStore", "RangeStatistics", "spread", "step_key"]

Layout = Literal["channels_last", "channels_first"]


class CalibrationError(ValueError):
    """Calibration met data it cannot use (NaN/Inf, inconsistent shapes); names node and timestep."""


def step_key(value: float) -> float:
    """Timesteps as dictionary keys: floats rounded so 999 and 999.0000001 coincide."""
    return round(float(value), 4)


def spread(vmin: Tensor, vmax: Tensor) -> float:
    """DGQ eq. 4 over vectors with these minima and maxima: (max a_max - min a_max) + (max a_min - min a_min)."""
    return float((vmax.max() - vmax.min()) + (vmin.max() - vmin.min()))


def _as_matrix(x: Tensor, layout: Layout) -> Tensor:
    """(batch, tokens, channels) view of an observed tensor."""
    if x.dim() < 2:
        return x.reshape(1, 1, -1) if x.dim() == 1 else x.reshape(1, 1, 1)
    if layout == "channels_first":
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


@dataclass
class RangeStatistics:
    """Per-channel and per-token min/max: DGQ eq. 4 needs both."""

    channel_min: Tensor
    channel_max: Tensor
    token_min: Tensor
    token_max: Tensor
    count: int  # elements per channel seen

    @classmethod
    def of(cls, x: Tensor, layout: Layout) -> RangeStatistics:
        m = _as_matrix(x.detach().float(), layout)
        per_token_min, per_token_max = m.amin(dim=2), m.amax(dim=2)  # (batch, tokens)
        flat = m.reshape(-1, m.shape[-1])
        return cls(
            channel_min=flat.amin(0),
            channel_max=flat.amax(0),
            token_min=per_token_min.amin(0),
            token_max=per_token_max.amax(0),
            count=flat.shape[0],
        )

    def merge(self, other: RangeStatistics) -> RangeStatistics:
        if other.channel_min.shape != self.channel_min.shape or other.token_min.shape != self.token_min.shape:
            raise ValueError(
                f"cannot merge statistics of shape (tokens={tuple(other.token_min.shape)}, "
                f"channels={tuple(other.channel_min.shape)}) into (tokens={tuple(self.token_min.shape)}, "
                f"channels={tuple(self.channel_min.shape)}): calibration inputs must share one shape"
            )
        return RangeStatistics(
            torch.minimum(self.channel_min, other.channel_min),
            torch.maximum(self.channel_max, other.channel_max),
            torch.minimum(self.token_min, other.token_min),
            torch.maximum(self.token_max, other.token_max),
            self.count + other.count,
        )

    def tokens_collapsed(self) -> RangeStatistics:
        """The same statistics with all tokens taken as one."""
        return RangeStatistics(self.channel_min, self.channel_max, self.token_min.amin().reshape(1),
                               self.token_max.amax().reshape(1), self.count)

    @property
    def min(self) -> float:
        return float(self.channel_min.min())

    @property
    def max(self) -> float:
        return float(self.channel_max.max())

    @property
    def device(self) -> torch.device:
        return self.channel_min.device

    def to(self, device: torch.device | str) -> RangeStatistics:
        return RangeStatistics(self.channel_min.to(device), self.channel_max.to(device), self.token_min.to(device),
                               self.token_max.to(device), self.count)

    def nbytes(self) -> int:
        tensors = (self.channel_min, self.channel_max, self.token_min, self.token_max)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ObservationStore:
    """Statistics for every (target, timestep) seen during calibration: RangeStatistics, or any
    statistic with ``merge``, ``to``, ``device`` and ``nbytes`` (``attention_statistics.CandidateErrors``)."""

    stats: dict[str, dict[float, RangeStatistics]] = field(default_factory=dict)

    def add(self, target: str, timestep: float, observed: RangeStatistics) -> None:
        per_t = self.stats.setdefault(target, {})
        key = step_key(timestep)
        per_t[key] = per_t[key].merge(observed) if key in per_t else observed

    def merge(self, other: ObservationStore) -> ObservationStore:
        out = ObservationStore({t: dict(v) for t, v in self.stats.items()})
        for target, per_t in other.stats.items():
            for key, observed in per_t.items():
                out.add(target, key, observed)
        return out

    def timesteps(self, target: str) -> list[float]:
        return sorted(self.stats.get(target, {}))

    def overall(self, target: str) -> RangeStatistics:
        """Statistics of a target over all steps. Where the token count changes from step to step
        (VAR's scales) a token has no identity across steps, so the token statistics collapse to one."""
        per_t = list(self.stats[target].values())
        if len({s.token_min.shape for s in per_t}) > 1:
            per_t = [s.tokens_collapsed() for s in per_t]
        out = per_t[0]
        for observed in per_t[1:]:
            out = out.merge(observed)
        return out

    def to(self, device: torch.device | str) -> ObservationStore:
        """The same statistics on ``device`` (to send them between processes through the CPU)."""
        return ObservationStore({t: {k: s.to(device) for k, s in per_t.items()} for t, per_t in self.stats.items()})

    def device(self) -> torch.device:
        """Where the statistics are (the device the model was calibrated on); the CPU when empty."""
        devices = (s.device for per_t in self.stats.values() for s in per_t.values())
        return next((d for d in devices if d is not None), torch.device("cpu"))

    def nbytes(self) -> int:
        return sum(s.nbytes() for per_t in self.stats.values() for s in per_t.values())
