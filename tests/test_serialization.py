import pytest
import torch

import lowbit
from lowbit.models.tiny import build
from lowbit.core.staging import OutputExistsError


@pytest.fixture
def quantized(calib):
    model = build("pixart")
    samples = calib("pixart")
    return model, lowbit.quantize(model, "minmax-w4a8", samples, progress=False), samples


def test_round_trip_is_exact(quantized, tmp_path):
    model, qmodel, samples = quantized
    lowbit.save(qmodel, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [".lowbit-output", "lowbit.json", "params.safetensors"]
    loaded = lowbit.load(tmp_path / "q", model)
    for args, kwargs in samples:
        assert torch.equal(loaded(*args, **kwargs)[0], qmodel(*args, **kwargs)[0])
    assert loaded.recipe == qmodel.recipe
    # no pickle anywhere: the safetensors header is JSON, the rest raw tensor bytes
    assert (tmp_path / "q" / "params.safetensors").read_bytes()[8:9] == b"{"


def test_failed_save_leaves_nothing_behind(quantized, tmp_path, monkeypatch):
    _, qmodel, _ = quantized

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lowbit.core.serialization.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(qmodel, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(quantized, tmp_path):
    _, qmodel, _ = quantized
    lowbit.save(qmodel, tmp_path / "q")
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True"):
        lowbit.save(qmodel, tmp_path / "q")
    lowbit.save(qmodel, tmp_path / "q", overwrite=True)
