"""The stressed reference model: the same function, with planted channel outliers of >= 20x the median."""

import torch

from lowbit.ir.statistics import RangeStatistics
from lowbit.models import text_encoder
from lowbit.models.reference import load_reference_model
from lowbit.models.stress import ATTENTION_OUTLIERS, FEED_FORWARD_OUTLIERS, plant_channel_outliers


def _inputs(timestep: float):
    emb, mask = text_encoder.encode(["a handwritten seven", "someone wrote the digit 3"])
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 1, 16, 16, generator=g), encoder_hidden_states=emb,
                encoder_attention_mask=mask, timestep=torch.full((2,), timestep), return_dict=False)


def _channel_ranges(model, inputs) -> dict[str, torch.Tensor]:
    """Per-channel range / median channel range at the inputs of attn1.to_q and ff.net.0.proj."""
    found, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith(("attn1.to_q", "ff.net.0.proj")):
            def hook(_, args, name=name):
                s = RangeStatistics.of(args[0], "channels_last")
                r = s.channel_max - s.channel_min
                found[name] = r / r.median()
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return found


def test_stressed_model_computes_the_same_function():
    model = load_reference_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stressed = plant_channel_outliers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    for t in (999.0, 500.0, 20.0):
        inputs = _inputs(t)
        with torch.no_grad():
            ref, out = model(**inputs)[0], stressed(**inputs)[0]
        # fp32 rounding only: x·f then w/f changes each product by a few ulps (~1e-7 relative); through
        # 6 blocks this measured 1e-7 - 3e-7 relative, so 1e-5 leaves margin, while one column left
        # undivided (attn1.to_v channel 0 of one block) measured 0.11.
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_planted_channels_are_at_least_20x_the_median_range():
    model = load_reference_model()
    stressed = plant_channel_outliers(model)
    inputs = _inputs(500.0)
    natural, planted = _channel_ranges(model, inputs), _channel_ranges(stressed, inputs)
    assert len(planted) == 12  # 6 blocks x (attention input, feed-forward input)
    for name, ratio in planted.items():
        channels = list(ATTENTION_OUTLIERS if name.endswith("to_q") else FEED_FORWARD_OUTLIERS)
        assert ratio[channels].min() >= 20, (name, ratio[channels])  # DGQ Figure 4: >= 20x the median
        assert natural[name].max() < 10  # the natural model has no such channel
