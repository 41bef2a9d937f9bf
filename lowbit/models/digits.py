"""Real training data for the project's small reference models.

No image data set can be downloaded here, but scikit-learn ships the UCI 8x8 handwritten digits
(1,797 real images). They are upsampled to 16x16 so that a patch-2 diffusion transformer sees
64 image tokens, and paired with several phrasings per class; some phrasing templates are held
out of training so that evaluation can test whether text conditioning generalizes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NAMES", "SEEN_TEMPLATES", "HELDOUT_TEMPLATES", "IMAGE_SIZE", "label_of", "load_split", "prompts_for"]

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w} is the number word, {d} the numeral.
SEEN_TEMPLATES = (
    "a handwritten {w}",
    "the number {d}",
    "digit {w}, thick strokes",
    "a picture of the digit {d}",
    "{w}",
    "an image of a handwritten number {w}",
    "the numeral {d} written by hand",
    "a scanned {w}",
)
HELDOUT_TEMPLATES = (
    "a sketch of {w}",
    "number {w} drawn with a pen",
    "someone wrote the digit {d}",
    "a small grayscale {w}",
)


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0).numpy()
    y = data.target.astype(np.int64)
    idx_train, idx_held = train_test_split(
        np.arange(len(y)), test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {"train": (x[idx_train], y[idx_train]), "heldout": (x[idx_held], y[idx_held])}


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 16, 16) in [-1, 1] and labels (N,) of the "train" or "heldout" split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    x, y = _split()[split]
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def prompts_for(label: int, which: str = "seen") -> list[str]:
    """All phrasings of one class: "seen" (used in training) or "heldout" (never trained on)."""
    templates = {"seen": SEEN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}.get(which)
    if templates is None:
        raise ValueError(f"which must be 'seen' or 'heldout', got {which!r}")
    return [t.format(w=NAMES[label], d=label) for t in templates]


@lru_cache(maxsize=1)
def _labels_by_prompt() -> dict[str, int]:
    return {p: c for c in range(len(NAMES)) for which in ("seen", "heldout") for p in prompts_for(c, which)}


def label_of(prompt: str) -> int:
    """The class a prompt of ``prompts_for`` names: how class-conditional models read a prompt."""
    label = _labels_by_prompt().get(prompt)
    if label is None:
        raise ValueError(f"{prompt!r} is not one of the digit prompts (lowbit.models.digits.prompts_for)")
    return label
