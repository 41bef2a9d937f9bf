"""The calibration set the distributed tests share."""

import pytest
import torch

from lowbit.evaluation.run import ReferenceCalibration
from lowbit.models.reference import load_reference_model


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """Two chunks of two prompts over three steps: each half holds every step, so per-step ranges merge."""
    samples = list(ReferenceCalibration(load_reference_model(), prompts=4, steps=3, chunk=2, progress=False))
    path = tmp_path_factory.mktemp("calibration") / "samples.pt"
    torch.save(samples, path)
    return path, samples
