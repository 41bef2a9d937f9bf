"""The quantized denoiser inside the diffusers pipelines' own denoising loops."""

import pytest
import torch

import lowbit
from lowbit.models.pipelines import pipeline_calls, tiny_pipeline


@pytest.mark.parametrize("name, attr", [("pixart", "transformer"), ("sd-unet", "unet")])
def test_pipeline_runs_with_quantized_denoiser(name, attr):
    pipe = tiny_pipeline(name)
    calibration = lowbit.record_denoiser_inputs(pipe, pipeline_calls(name, prompts=2, steps=4), progress=False)
    assert len(calibration) == 2 * 4  # one denoiser call per step, CFG batched
    assert calibration[0][1]["encoder_hidden_states"].shape[0] == 2  # [uncond; cond]
    qmodel = lowbit.quantize(getattr(pipe, attr), "minmax-w8a8", calibration, progress=False)
    call = pipeline_calls(name, prompts=1, steps=4, seed=7)[0]
    fp = pipe(**call).images
    setattr(pipe, attr, qmodel)
    images = pipe(**pipeline_calls(name, prompts=1, steps=4, seed=7)[0]).images
    assert images.shape == fp.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    # same seed and prompt: W8A8 images stay within 5% (relative L2) of full precision (measured 0.4-1.4%)
    assert ((images - fp).norm() / fp.norm()).item() < 0.05


def test_streamed_calibration_quantizes_exactly_as_the_recorded_list():
    """One pipeline call's inputs at a time, the same statistics: the stream and the list agree bit for bit."""
    pipe = tiny_pipeline("pixart")
    recorded = lowbit.record_denoiser_inputs(pipe, pipeline_calls("pixart", prompts=3, steps=3), progress=False)
    stream = lowbit.DenoiserInputStream(pipe, pipeline_calls("pixart", prompts=3, steps=3), progress=False)
    from_list = lowbit.quantize(pipe.transformer, "minmax-w8a8", recorded, progress=False)
    from_stream = lowbit.quantize(pipe.transformer, "minmax-w8a8", stream, progress=False)
    assert len(recorded) == 9 and from_list.params.keys() == from_stream.params.keys()
    for name, p in from_list.params.items():
        for key, t in p.tensors().items():
            assert torch.equal(t, from_stream.params[name].tensors()[key]), (name, key)
