"""Typed artifacts: a kind registered by the test saves and loads bit-exactly beside the parameters,
and a tampered or foreign-version file is refused with a clear message and no partial state."""

import dataclasses
import json

import pytest
import torch
from torch import Tensor

import lowbit
from lowbit.ir.artifacts import ARTIFACTS, Artifact
from lowbit.models.tiny import build
from lowbit.core import serialization
from lowbit.core.serialization import SerializationError
from tests.conftest import calibration_set


@dataclasses.dataclass(frozen=True)
class _Windows(Artifact):
    """A toy artifact in the shape the MDWA issue needs: per-block band widths and a mask."""

    KIND = "test.windows"
    VERSION = 3
    widths: tuple[tuple[int, ...], ...]
    ratio: float
    mask: Tensor


@pytest.fixture(scope="module")
def quantized():
    model, samples = build("pixart"), calibration_set("pixart")
    qmodel = lowbit.quantize(model, "minmax-w8a8", samples, progress=False)
    torch.manual_seed(0)
    qmodel.artifacts["windows"] = _Windows(widths=((1, 2), (3, 4)), ratio=0.95, mask=torch.randn(3, 5).bfloat16())
    return model, qmodel, samples


@pytest.fixture
def saved(quantized, tmp_path):
    lowbit.save(quantized[1], tmp_path / "q")
    return *quantized, tmp_path / "q"


def test_artifact_round_trips_bit_exactly(saved):
    model, qmodel, samples, path = saved
    loaded = lowbit.load(path, model)
    restored, original = loaded.artifacts["windows"], qmodel.artifacts["windows"]
    assert isinstance(restored, _Windows) and restored.widths == original.widths and restored.ratio == original.ratio
    assert restored.mask.dtype == torch.bfloat16 and torch.equal(restored.mask.view(torch.int16), original.mask.view(torch.int16))
    assert torch.equal(loaded(**samples[0][1])[0], qmodel(**samples[0][1])[0])


def _edit_json(path, change):
    """Change the saved JSON as another lowbit (or code) would have written it: with its own digest."""
    meta = json.loads((path / "lowbit.json").read_text())
    change(meta)
    meta["meta_digest"] = serialization._meta_digest(meta)
    (path / "lowbit.json").write_text(json.dumps(meta))


def _refused(model, path, message):
    registered = dict(ARTIFACTS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError, match=message):
        lowbit.load(path, model)
    assert ARTIFACTS == registered  # no partial state: nothing registered, the model untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_foreign_version_is_refused(saved):
    model, _, _, path = saved
    _edit_json(path, lambda m: m["artifacts"]["windows"].update(version=2))
    _refused(model, path, r"artifact 'windows' is test.windows version 2, but this lowbit reads version 3; re-quantize")


def test_unknown_kind_is_refused(saved):
    model, _, _, path = saved
    _edit_json(path, lambda m: m["artifacts"]["windows"].update(kind="test.gone"))
    _refused(model, path, r"artifact 'windows' is of kind 'test.gone', which this lowbit does not know")


def test_edited_fields_are_refused(saved):
    model, _, _, path = saved
    _edit_json(path, lambda m: m["artifacts"]["windows"]["data"].pop("ratio"))
    _refused(model, path, r"artifact 'windows' \(test.windows\) has fields .* expected")
