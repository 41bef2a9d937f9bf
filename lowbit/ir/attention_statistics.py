"""What each candidate probability quantizer would do to an attention layer's output, streamed.

Choosing between a uniform and a log2 grid for a layer's probabilities P (and whether to keep the
start-token column apart) is choosing which error ε = Q(P) − P hurts the output P·V least, and
that depends on V as much as on P: ‖ε V‖² ≈ σ²·Σ ε² + |μ|²·Σ_rows (Σ_j ε_ij)² for V = μ + δ. A
uniform grid zeroes a long tail; the mass it loses multiplies V's common part μ, which the
probabilities' squared error does not see. Measured on synthetic maps (256-1024 keys, V with a
unit mean), ranking candidates by the probabilities' squared error picked the uniform grid where
log2's output error was half of it, and a histogram-based estimate of the coherent term (which
must assume the lost mass spreads evenly over rows) still ranked 2 of 6 cases wrong.

So calibration measures the output error itself: at every call, each candidate quantizes the
probabilities with its run-time scale (the call's maximum, DGQ eq. 8) and Σ ‖(Q(P) − P) V‖² is
added up, per layer and step — four scalars, whatever the number of samples; nothing of the maps
is kept, and a call's maps are quantized a few (batch, head) slices at a time (64 MB), so an SD
map of 4,096² per head needs no copy of itself. The cost is four extra quantize-and-multiply
passes per attention call, at calibration only. For recipes with static per-step ranges the
choice is made at the call's scale, which the step's range (the maximum over its calls) approaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.ops import TINY, quantize_probs

__all__ = ["CANDIDATES", "CandidateErrors", "candidate_name"]

CANDIDATES = (("uniform", False), ("log2", False), ("uniform", True), ("log2", True))  # ties go to the earlier
_CHUNK = 1 << 24  # probabilities quantized at a time (64 MB of float32)


def candidate_name(scheme: str, split: bool) -> str:
    return scheme + ("+start" if split else "")


@dataclass
class CandidateErrors:
    """Σ ‖(Q_c(P) − P) V‖² per candidate c (inf where c keeps a start column the layer has none of),
    Σ ‖P V‖², and the start column's summed probability over ``rows`` query rows (which tells a
    sink-dominated layer, near 1 per row, from a spread one)."""

    squared: Tensor  # (len(CANDIDATES),) float64
    energy: float
    start_mass: float
    rows: int

    @classmethod
    def of(cls, probs: Tensor, v: Tensor, start_column: int | None, levels: int) -> CandidateErrors:
        lead = torch.broadcast_shapes(probs.shape[:-2], v.shape[:-2])
        p = probs.detach().float().expand(*lead, *probs.shape[-2:]).reshape(-1, *probs.shape[-2:])
        v = v.detach().float().expand(*lead, *v.shape[-2:]).reshape(-1, *v.shape[-2:])
        # the run-time scales (DGQ eq. 8) are maxima over the whole call: taken first, so that the maps are
        # then quantized a few (batch, head) slices at a time and no candidate's copy of a whole map exists
        peak_all = p.amax().clamp_min(TINY)
        peak_rest = None
        if start_column is not None:
            others = torch.ones(p.shape[-1], dtype=torch.bool, device=p.device)
            others[start_column] = False
            peak_rest = p[..., others].amax().clamp_min(TINY) if others.any() else peak_all
        applicable = [not split or start_column is not None for _, split in CANDIDATES]
        squared = torch.tensor([0.0 if ok else math.inf for ok in applicable], dtype=torch.float64)
        energy = 0.0
        step = max(1, _CHUNK // max(1, p[0].numel()))
        for p_chunk, v_chunk in zip(p.split(step), v.split(step)):
            energy += float(torch.matmul(p_chunk, v_chunk).double().pow(2).sum())
            for c, ((scheme, split), ok) in enumerate(zip(CANDIDATES, applicable)):
                if not ok:
                    continue
                peak = peak_rest if split else peak_all
                scale = peak if scheme == "log2" else peak / (levels - 1)
                q = quantize_probs(p_chunk, scale, torch.zeros_like(scale), scheme, 0, levels - 1,
                                   start_column if split else -1, dynamic_scale=False)
                squared[c] += float(torch.matmul(q - p_chunk, v_chunk).double().pow(2).sum())
        start_mass = float(p[..., start_column].sum()) if start_column is not None else math.nan
        return cls(squared, energy, start_mass, p.numel() // p.shape[-1])

    def merge(self, other: CandidateErrors) -> CandidateErrors:
        return CandidateErrors(self.squared + other.squared, self.energy + other.energy,
                               self.start_mass + other.start_mass, self.rows + other.rows)

    device = None  # a few numbers on the CPU, wherever the model runs

    def to(self, device: torch.device | str) -> CandidateErrors:
        return self

    def nbytes(self) -> int:
        return self.squared.numel() * 8 + 24
