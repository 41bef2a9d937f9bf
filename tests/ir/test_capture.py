"""Capture of the real diffusers classes (small configs)."""

import pytest
import torch

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.capture import CaptureError, SIGNATURE_KEY, capture, normalize_inputs
from lowbit.models.tiny import TINY_MODELS, build

EXPECTED_LAYER = {
    "sd-unet": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
    "sdxl-unet": "add_embedding.linear_1",
    "pixart": "transformer_blocks.1.attn2.to_q",
    "sana": "transformer_blocks.0.attn2.to_k",
    "sd3": "transformer_blocks.0.attn.add_k_proj",
    "flux": "single_transformer_blocks.0.proj_mlp",
}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_capture_reproduces_the_model_and_keeps_module_paths(name, calib):
    model = build(name)
    (args, kwargs), = calib(name)[:1]
    gm = capture(model, args, kwargs)
    inputs = normalize_inputs(model, args, kwargs, "timestep")
    # the same aten ops in the same order: bitwise equal
    assert torch.equal(gm(**inputs)[0], model(**kwargs, return_dict=False)[0])
    paths = {n.meta[LAYER_KEY].path for n in gm.graph.nodes if LAYER_KEY in n.meta}
    assert EXPECTED_LAYER[name] in paths
    # the batch dimension is dynamic: classifier-free guidance doubles it
    big = TINY_MODELS[name].inputs(4, torch.Generator().manual_seed(1))
    assert gm(**normalize_inputs(model, (), big, "timestep"))[0].shape[0] == 4
    assert gm.meta[SIGNATURE_KEY].inputs["timestep"].shape == (None,)


def test_positional_and_int_timestep_calls_normalize_alike():
    model = build("pixart")
    kw = TINY_MODELS["pixart"].inputs(2, torch.Generator().manual_seed(0))
    a = normalize_inputs(model, (kw["hidden_states"],), {"encoder_hidden_states": kw["encoder_hidden_states"], "timestep": 500, "return_dict": False}, "timestep")
    b = normalize_inputs(model, (), {**kw, "timestep": torch.tensor(500)}, "timestep")
    assert a.keys() == b.keys() and torch.equal(a["timestep"], b["timestep"]) and a["timestep"].shape == (2,)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(x) * 2


class _Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value cannot be captured
            return x
        return -x


def test_uncapturable_model_names_the_module():
    with pytest.raises(CaptureError, match=r"inside module 'gate'.*Try:"):
        capture(_DataDependent(), (torch.randn(2, 3),), step_arg=None)


def test_calibrated_at_batch_1_runs_at_any_batch(tmp_path):
    """torch.export specialises a batch of 1; lowbit captures at 2 so the batch stays dynamic,
    before and after save/load."""
    import lowbit
    from tests.conftest import calibration_set

    model = build("pixart")
    one = [((), {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in kw.items()})
           for _, kw in calibration_set("pixart")]
    qmodel = lowbit.quantize(model, "minmax-w8a8", one, progress=False)
    lowbit.save(qmodel, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", model)
    for batch in (1, 2, 5):
        kw = calibration_set("pixart", batch=batch)[0][1]
        out = qmodel(**kw)[0]
        assert out.shape[0] == batch and torch.equal(out, loaded(**kw)[0])


def test_float64_inputs_to_a_float32_model_are_refused_naming_the_argument():
    from tests.conftest import calibration_set

    model = build("pixart")
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in calibration_set("pixart")[0][1].items()}
    with pytest.raises(CaptureError, match="input 'hidden_states' is float64"):
        capture(model, (), kwargs)
