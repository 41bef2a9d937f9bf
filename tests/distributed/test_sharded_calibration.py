"""Calibration under torchrun: two processes, each on half of a calibration set, decide bit for bit
what one process decides on the whole set (issue: scale out, done 1)."""

import torch

from lowbit import quantize
from lowbit.core.quantize import _KeptSamples
from lowbit.models.reference import load_reference_model
from lowbit.recipes import get_recipe
from tests.distributed.decisions import decisions
from tests.distributed.launch import torchrun


def test_two_processes_decide_what_one_process_decides(calibration_file, tmp_path):
    path, samples = calibration_file
    # weight reconstruction keeps 4 of the 6 samples: which ones must not depend on the split
    adaround = get_recipe("adaround-w4a8").with_pass("reconstruct_weights", iterations=5, samples=4)
    (tmp_path / "adaround.toml").write_text(adaround.to_toml())
    recipes = ["minmax-w8a8", "dgq-w4a6", str(tmp_path / "adaround.toml")]
    run = torchrun("-m", "tests.distributed.shard_worker", "--calibration", str(path), "--out", str(tmp_path),
                    *[a for r in recipes for a in ("--recipe", r)])
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = load_reference_model()
    for recipe in recipes:
        whole = decisions(quantize(model, recipe, samples, progress=False))
        assert "dgq" not in recipe or any("groups=(" in v for v in whole.values() if isinstance(v, str))  # K-means groups
        for r, decided in enumerate(ranks):
            assert decided[recipe].keys() == whole.keys(), (recipe, r)
            for name, value in whole.items():
                got = decided[recipe][name]
                same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
                assert same, f"{recipe}: rank {r} decided {name} differently from one process"


def test_a_failing_rank_stops_every_rank_with_its_reason(calibration_file, tmp_path):
    path, _ = calibration_file
    run = torchrun("-m", "tests.distributed.shard_worker", "--calibration", str(path), "--out", str(tmp_path),
                    "--recipe", "minmax-w8a8", "--empty-shard", "1")
    assert run.returncode != 0
    assert "rank 1: ValueError: calibration is empty on rank 1 of 2" in run.stderr
    assert "rank 0: DistributedError: rank 1 of 2 failed: ValueError: calibration is empty" in run.stderr
    assert not list(tmp_path.glob("rank*.pt"))


def test_the_kept_samples_depend_on_the_samples_only():
    samples = [{"x": torch.full((2,), float(i)), "t": torch.tensor(i)} for i in range(20)]
    kept = []
    for order in (samples, samples[::-1], samples[1::2] + samples[0::2]):
        k = _KeptSamples(5)
        for s in order:
            k.offer(s)
        kept.append([int(s["t"]) for s in k.gathered()])
    assert kept[0] == kept[1] == kept[2] and len(set(kept[0])) == 5
