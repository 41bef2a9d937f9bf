"""Per-layer settings on the shipped reference model: the report shows them, the cost counts them."""

import torch

import lowbit
from lowbit.reports.accounting import FP_BITS, cost
from lowbit.evaluation.run import calibrate_reference
from lowbit.models.reference import load_reference_model
from lowbit.recipes import Recipe

MLP = "transformer_blocks.3.ff.*"


def _linear_flops(model, args, kwargs) -> dict[str, float]:
    """2 · rows · in · out of every nn.Linear, from the shapes its forward really sees (hooks)."""
    flops = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: flops.__setitem__(name, 2.0 * i[0][..., 0].numel() * m.in_features * m.out_features))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in hooks:
        h.remove()
    return flops


def test_w4a8_with_one_mlp_at_w8a8_and_proj_out_in_float():
    model = load_reference_model()
    calibration = calibrate_reference(model, prompts=1, steps=2, progress=False)
    uniform = Recipe.build("w4a8", 4, 8, keep_io_layers=False)
    mixed = Recipe.build("w4a8-mixed", 4, 8, keep_io_layers=False,
                         layers={MLP: {"weight_bits": 8, "activation_bits": 8}, "proj_out": {"float": True}})
    q_uniform = lowbit.quantize(model, uniform, calibration, progress=False)
    q_mixed = lowbit.quantize(model, mixed, calibration, progress=False)

    rows = {r.layer: r for r in lowbit.layer_report(q_mixed, calibration[:1])}
    for name in ("transformer_blocks.3.ff.net.0.proj", "transformer_blocks.3.ff.net.2"):
        assert (rows[name].weight_bits, rows[name].activation_bits, rows[name].set_by) == (8, 8, f'layers."{MLP}"')
    assert (rows["proj_out"].weight_bits, rows["proj_out"].granularity, rows["proj_out"].set_by) == (None, "float", 'layers."proj_out"')
    assert (rows["transformer_blocks.2.ff.net.2"].weight_bits, rows["transformer_blocks.2.ff.net.2"].set_by) == (4, "recipe")

    # the hand count: the mixed model costs the uniform one plus what each overridden layer adds
    args, kwargs = calibration[0]
    flops = _linear_flops(model, args, kwargs)
    mlp = [n for n in flops if n.startswith("transformer_blocks.3.ff.")]
    assert len(mlp) == 2
    a, b = cost(q_uniform, args, kwargs), cost(q_mixed, args, kwargs)
    extra_bops = sum(flops[n] for n in mlp) * (8 * 8 - 4 * 8) + flops["proj_out"] * (FP_BITS * FP_BITS - 4 * 8)
    assert b.flops == a.flops
    assert b.bops - a.bops == extra_bops
    # size: the MLP's weights take 8 bits instead of 4; proj_out keeps its float32 weight instead of
    # int4 values + a float32 scale per output channel + its input's per-step (scale, zero point, step) table
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in mlp + ["proj_out"]}
    steps = len(q_uniform.params["proj_out:input"].timesteps)
    proj = weights["proj_out"]
    extra_size = sum(weights[n].numel() * (8 - 4) / 8 for n in mlp) \
        + proj.numel() * 4 - (proj.numel() / 2 + proj.shape[0] * 4 + 3 * steps * 4)
    assert b.size_bytes - a.size_bytes == extra_size
