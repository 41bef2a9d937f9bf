"""The record of a quantization-aware training run, saved with the model it made.

One entry per step: the weights' bit-width (of the layers at the recipe's weight bit-width) and
the distillation loss. Saved as an artifact, so the loss/bit-width curve of a saved model can be
drawn again (``lowbit.reports.training_curve``) and a checkpoint resumes with its past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.artifacts import Artifact

__all__ = ["HISTORY_ARTIFACT", "TrainingHistory"]

HISTORY_ARTIFACT = "qat_history"


@dataclass(frozen=True)
class TrainingHistory(Artifact):
    KIND = "training_history"

    bits: Tensor  # float32, one per step
    loss: Tensor  # float32, one per step
    schedule: str  # how the bit-widths were chosen, in words

    def __post_init__(self) -> None:
        if self.bits.shape != self.loss.shape or self.bits.dim() != 1:
            raise ValueError(f"a training history holds one bit-width and one loss per step; got {tuple(self.bits.shape)} "
                             f"and {tuple(self.loss.shape)}")

    @classmethod
    def of(cls, bits: list[float], loss: list[float], schedule: str) -> TrainingHistory:
        return cls(torch.tensor(bits, dtype=torch.float32), torch.tensor(loss, dtype=torch.float32), schedule)
