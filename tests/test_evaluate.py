"""lowbit eval on the shipped reference model, at a size that runs in seconds."""

import math

import pytest
import torch

from lowbit.cli import main
from lowbit.evaluation.run import ReferenceCalibration, calibrate_reference, run_eval
from lowbit.models.reference import load_reference_model
from lowbit.core.quantize import quantize


def test_eval_rows_are_deterministic_and_complete():
    kwargs = dict(samples=10, steps=4, calibration_prompts=4, progress=False)
    rows, grid = run_eval(["minmax-w8a8"], **kwargs)
    again, _ = run_eval(["minmax-w8a8"], **kwargs)
    strip = lambda rs: [r.__dict__ | {"seconds": 0} for r in rs]  # noqa: E731
    assert strip(rows) == strip(again)  # same seed, same numbers
    fp, w8 = rows
    assert (fp.model, w8.model) == ("full precision", "minmax-w8a8")
    assert fp.psnr_vs_fp is None and w8.psnr_vs_fp > 20  # W8A8 stays close to the FP samples
    assert w8.gbops < fp.gbops / 8 and w8.size_kb < fp.size_kb / 3
    assert all(math.isfinite(v) for v in (w8.fid, w8.inception_score, w8.alignment_seen))
    assert list(grid) == ["full precision", "minmax-w8a8"] and grid["minmax-w8a8"].shape[0] == 10


def test_eval_command_writes_table_and_grid(tmp_path, capsys, mixed_recipe):
    out = tmp_path / "ev"
    assert main(["eval", "--recipe", str(mixed_recipe), "--samples", "10", "--steps", "3",
                 "--calibration-prompts", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lowbit-output", "eval.csv", "eval.md", "samples.png"]
    assert "| w4a8-mixed | 4/8 |" in capsys.readouterr().out


def test_extra_samplers_get_rows_without_costs():
    from lowbit.evaluation.run import markdown
    from lowbit.evaluation.harness import blob_sampler

    rows, grid = run_eval([], samples=10, steps=2, extra_samplers={"blobs": blob_sampler}, progress=False)
    assert [r.model for r in rows] == ["full precision", "blobs"]
    blobs = rows[1]
    assert math.isnan(blobs.gbops) and blobs.psnr_vs_fp < 15  # blobs look nothing like the FP digits
    assert "| blobs | – |" in markdown(rows)


def test_streamed_calibration_replays_and_matches_the_recorded_list():
    model = load_reference_model()
    stream = ReferenceCalibration(model, prompts=4, steps=2, chunk=2, progress=False)
    first, again = list(stream), list(stream)
    assert len(first) == len(stream) == 4 and all(kw["hidden_states"].shape[0] == 4 for _, kw in first)  # 2 chunks x 2 steps, CFG-doubled
    assert all(torch.equal(a[1]["hidden_states"], b[1]["hidden_states"]) for a, b in zip(first, again))  # replayable
    streamed = quantize(model, "minmax-w8a8", stream, progress=False).params
    recorded = quantize(model, "minmax-w8a8", calibrate_reference(model, 4, 2, progress=False), progress=False).params
    assert streamed.keys() == recorded.keys()
    for target, p in recorded.items():
        # the same images in other batches: equal up to fp32 batch-size effects in the matmuls (measured bit-equal here)
        torch.testing.assert_close(streamed[target].scale, p.scale, rtol=1e-5, atol=0)


def test_stressed_model_is_selectable_and_samples_the_same_images():
    _, natural = run_eval([], samples=4, steps=3, progress=False)
    _, stressed = run_eval([], samples=4, steps=3, progress=False, model_name="reference-stressed")
    # the same function up to fp32 rounding (1e-7 relative per denoiser call, see tests/models/test_stress.py);
    # 3 solver steps keep pixel differences far below one 8-bit gray level (2/255 = 0.008)
    assert (natural["full precision"] - stressed["full precision"]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="unknown model 'sd'; choose one of reference, reference-stressed"):
        run_eval([], samples=2, steps=1, model_name="sd")
