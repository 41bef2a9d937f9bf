"""How far apart the two halves of a classifier-free-guidance batch are at an attention's output, streamed.

A CFG batch stacks the conditional and the unconditional inputs (VAR: [class; null], diffusers:
[negative; prompt]); LiteVAR (§3, Fig. 2b) and DiTFastAttn find the attention outputs of the two
halves close enough in many layers that one half's output can stand for both. Whether it may is
measured at calibration: per layer and step, Σ|a − b| and the L1 mass of each half (a: first half,
b: second), summed over the samples; the relative L1 difference Σ|cond − uncond| / Σ|uncond| is
DiTFastAttn's criterion. Three numbers per layer and step, whatever the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.statistics import CalibrationError

__all__ = ["HalfDifference"]


@dataclass
class HalfDifference:
    """Σ|first − second|, Σ|first| and Σ|second| over the halves of CFG batches, and the entries of one
    sample's attention map (heads × queries × keys) for counting the work sharing saves."""

    difference: float
    first: float
    second: float
    entries: int

    @classmethod
    def of(cls, output: Tensor, probs: Tensor) -> HalfDifference:
        if output.shape[0] % 2:
            raise CalibrationError(f"CFG sharing needs batches of [conditional; unconditional] halves; this attention's "
                                   f"batch is {output.shape[0]}, odd: calibrate with the CFG batches the model runs")
        a, b = output.detach().double().chunk(2)
        return cls(float((a - b).abs().sum()), float(a.abs().sum()), float(b.abs().sum()), probs[0].numel())

    def merge(self, other: HalfDifference) -> HalfDifference:
        return HalfDifference(self.difference + other.difference, self.first + other.first, self.second + other.second,
                              max(self.entries, other.entries))

    device = None  # a few numbers on the CPU, wherever the model runs

    def to(self, device: torch.device | str) -> HalfDifference:
        return self

    def nbytes(self) -> int:
        return 32
