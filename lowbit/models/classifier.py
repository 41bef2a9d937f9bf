"""Small CNN digit classifier: the feature extractor and judge of the evaluation harness.

It stands in for Inception (FID, IS) and CLIP (text alignment) on 16x16 digits. The penultimate
embedding is 32-dimensional so that a Frechet distance estimated from ~1,000 samples is stable
(a 32x32 covariance needs far fewer samples than Inception's 2048x2048).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["FEATURE_DIM", "WEIGHTS", "DigitClassifier", "load_classifier"]

FEATURE_DIM = 32
WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"


class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) images in [-1, 1] -> 32-d features -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def load_classifier(path: Path = WEIGHTS) -> DigitClassifier:
    """The shipped classifier, in eval mode with frozen weights."""
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    model.eval().requires_grad_(False)
    return model
