"""Which probability quantizer each attention layer got, chosen from what calibration measured.

DGQ's log2 grid suits attention dominated by a start-token peak with a long tail (SD's Figure 5)
and costs 4.6 dB where attention is spread (the README's ablation); the start-token split helps
only where that column holds much of the mass. ``attention_scheme = "auto"`` leaves the choice to
calibration: for each attention layer, every candidate — uniform or log2, with or without the
start column kept exact — has its output error Σ ‖(Q(P) − P) V‖² measured at every calibrated step
(``lowbit.ir.attention_statistics``), and the layer takes the candidate with the least error summed
over steps. The decision is an artifact, saved with the model; ``convert_to_quantized_ops``
applies it, so ``lowbit.load`` rebuilds the same ops.

One scheme per layer, not per step: the quantized attention op has one grid, and a per-step grid
would need both quantizers in every target's graph. The artifact keeps every step's errors, so
``per_step_gain`` says what choosing per step would have saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.annotations import QuantAnnotation
from lowbit.ir.artifacts import Artifact
from lowbit.ir.attention_statistics import CANDIDATES, CandidateErrors, candidate_name

__all__ = ["ATTENTION_SCHEMES", "AttentionSchemes", "errors_target"]

ATTENTION_SCHEMES = "attention_schemes"  # the artifact's name in the pass context


def errors_target(layer: str) -> str:
    """Where calibration files a layer's CandidateErrors in the ObservationStore."""
    return f"{layer}:probs_candidates"


@dataclass(frozen=True)
class AttentionSchemes(Artifact):
    """Per attention layer: the chosen candidate and every candidate's output error at every step.

    ``errors[l, s, c]`` is Σ ‖(Q_c(P) − P) V‖² of layer l at step s (inf where candidate c keeps a
    start column the layer does not have), ``energy[l, s]`` the Σ ‖P V‖² it is relative to, and
    ``start_mass[l]`` the mean probability of the start column per query row (NaN: none).
    """

    KIND = "attention_schemes"

    layers: tuple[str, ...]
    chosen: tuple[str, ...]
    candidates: tuple[str, ...]
    steps: Tensor
    errors: Tensor
    energy: Tensor
    start_mass: Tensor

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.steps.numel(), len(self.candidates))
        if tuple(self.errors.shape) != shape or tuple(self.energy.shape) != shape[:2] or len(self.chosen) != len(self.layers):
            raise ValueError(f"attention schemes for {len(self.layers)} layers, {self.steps.numel()} steps and "
                             f"{len(self.candidates)} candidates do not fit errors {tuple(self.errors.shape)}, "
                             f"energy {tuple(self.energy.shape)} and {len(self.chosen)} choices")

    @classmethod
    def decide(cls, measured: dict[str, dict[float, CandidateErrors]]) -> AttentionSchemes:
        """Each layer's candidate with the least output error summed over its calibrated steps."""
        layers = sorted(measured)
        steps = sorted({t for per_step in measured.values() for t in per_step})
        errors = torch.zeros(len(layers), len(steps), len(CANDIDATES), dtype=torch.float64)
        energy = torch.zeros(len(layers), len(steps), dtype=torch.float64)
        start_mass = torch.empty(len(layers), dtype=torch.float64)
        for i, layer in enumerate(layers):
            per_step = measured[layer]
            for j, t in enumerate(steps):
                if t in per_step:
                    errors[i, j], energy[i, j] = per_step[t].squared, per_step[t].energy
            start_mass[i] = sum(e.start_mass for e in per_step.values()) / sum(e.rows for e in per_step.values())
        chosen = tuple(candidate_name(*CANDIDATES[int(c)]) for c in errors.sum(1).argmin(1)) if layers else ()
        return cls(tuple(layers), chosen, tuple(candidate_name(*c) for c in CANDIDATES),
                   torch.tensor(steps, dtype=torch.float64), errors, energy, start_mass)

    def choice(self, layer: str) -> tuple[str, bool] | None:
        """(scheme, keep the start column apart) chosen for ``layer``; None if it was not chosen here."""
        if layer not in self.layers:
            return None
        return CANDIDATES[self.candidates.index(self.chosen[self.layers.index(layer)])]

    def apply(self, layer: str, annotation: QuantAnnotation) -> QuantAnnotation:
        """``annotation`` with the probability scheme and start column chosen for ``layer``."""
        scheme, split = self.choice(layer)
        if split and annotation.start_token is None:
            raise ValueError(f"{layer}: the chosen {candidate_name(scheme, split)} keeps a start-token column apart, but "
                             f"the annotation marks none (was split_start_token left out of the recipe?)")
        return dataclasses.replace(annotation, probs=dataclasses.replace(annotation.probs, scheme=scheme),
                                   start_token=annotation.start_token if split else None)

    def relative_errors(self) -> Tensor:
        """(layers, candidates): the attention output's relative error sqrt(Σ error / Σ ‖P V‖²) over all steps."""
        return (self.errors.sum(1) / self.energy.sum(1, keepdim=True).clamp_min(1e-30)).sqrt()

    def per_step_gain(self) -> Tensor:
        """(layers,): error of the best candidate per step over the error of the one chosen for all steps
        (1: a per-step choice would save nothing)."""
        best_per_step = self.errors.min(2).values.sum(1)
        return best_per_step / self.errors.sum(1).min(1).values.clamp_min(1e-30)
