"""Attention sharing across classifier-free guidance (ASC, LiteVAR §3): which layers compute their
attention on the conditional half of a CFG batch only and hand the result to the unconditional half.

LiteVAR shares in every layer; DiTFastAttn shares where the relative L1 difference of the two halves'
attention outputs, Σ|cond − uncond| / Σ|uncond| measured at calibration, stays under a threshold.
The threshold ``inf`` is LiteVAR's rule. One choice per layer for all steps: a shared layer's graph
computes half the attention batch (a per-step choice would need both forms in the graph); the
artifact keeps every step's difference. Which half is conditional is the model's convention
(``cfg_layout``, recorded at capture: VAR puts [class; null], diffusers pipelines [negative; prompt]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.artifacts import Artifact
from lowbit.ir.capture import CFG_LAYOUTS
from lowbit.ir.cfg_statistics import HalfDifference

__all__ = ["CFG_SHARING", "CFGSharing", "difference_target"]

CFG_SHARING = "cfg_sharing"  # the artifact's name in the pass context


def difference_target(layer: str) -> str:
    """Where calibration files a layer's HalfDifference in the ObservationStore."""
    return f"{layer}:cfg_difference"


@dataclass(frozen=True)
class CFGSharing(Artifact):
    """``difference[l, s]``: layer l's relative L1 difference of the unconditional half's attention output
    from the conditional half's at step s; ``entries[l, s]`` one sample's attention-map entries there;
    ``shared[l]`` whether layer l computes the conditional half only."""

    KIND = "cfg_sharing"

    layers: tuple[str, ...]
    layout: str
    threshold: float
    steps: Tensor
    difference: Tensor
    entries: Tensor
    shared: Tensor

    def __post_init__(self) -> None:
        if self.layout not in CFG_LAYOUTS:
            raise ValueError(f"cfg layout must be one of {CFG_LAYOUTS}, got {self.layout!r}")
        shape = (len(self.layers), self.steps.numel())
        if tuple(self.difference.shape) != shape or tuple(self.entries.shape) != shape or tuple(self.shared.shape) != shape[:1]:
            raise ValueError(f"cfg sharing for {shape[0]} layers and {shape[1]} steps does not fit difference "
                             f"{tuple(self.difference.shape)}, entries {tuple(self.entries.shape)}, shared {tuple(self.shared.shape)}")

    @classmethod
    def decide(cls, measured: dict[str, dict[float, HalfDifference]], layout: str, threshold: float) -> CFGSharing:
        """Share in each layer whose difference over all its steps is at most ``threshold``."""
        layers = sorted(measured)
        steps = sorted({t for per_step in measured.values() for t in per_step})
        difference = torch.full((len(layers), len(steps)), math.nan, dtype=torch.float64)
        entries = torch.zeros(len(layers), len(steps), dtype=torch.int64)
        shared = torch.zeros(len(layers), dtype=torch.bool)
        for i, layer in enumerate(layers):
            per_step = measured[layer]
            for j, t in enumerate(steps):
                if t in per_step:
                    d = per_step[t]
                    difference[i, j] = d.difference / max(cls._unconditional(d, layout), 1e-30)
                    entries[i, j] = d.entries
            total = sum(d.difference for d in per_step.values())
            shared[i] = total / max(sum(cls._unconditional(d, layout) for d in per_step.values()), 1e-30) <= threshold
        return cls(tuple(layers), layout, float(threshold), torch.tensor(steps, dtype=torch.float64), difference, entries, shared)

    @staticmethod
    def _unconditional(d: HalfDifference, layout: str) -> float:
        return d.second if layout == "conditional_first" else d.first

    def computed_half(self, layer: str) -> int:
        """Which half of the batch ``layer`` computes and copies onto the other (0: first, 1: second);
        -1 when it computes both."""
        if layer not in self.layers or not bool(self.shared[self.layers.index(layer)]):
            return -1
        return 0 if self.layout == "conditional_first" else 1
