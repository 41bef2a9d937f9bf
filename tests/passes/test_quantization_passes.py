"""annotate_quantization, insert_observers, choose_quant_params and convert_to_quantized_ops on the tiny graph."""

import pytest
import torch

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.params import target_name
from lowbit.ir.statistics import CalibrationError
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.base import PassContext, PassError
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.choose_quant_params import ChooseQuantParams, weight_params
from lowbit.passes.convert_to_quantized_ops import ConvertToQuantizedOps
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.pipeline import Pipeline
from tests.passes.conftest import tiny_inputs

W8 = QuantSpec(8, granularity="channel", axis=0, symmetric=True)
A8 = QuantSpec(8, mode="per_timestep")
lowbit = torch.ops.lowbit


def _annotate(**kw):
    return AnnotateQuantization(W8, A8, A8, **kw)


def _prepared(gm, ctx, **kw):
    return Pipeline([CanonicalizeAttention(), _annotate(**kw), InsertObservers()]).run(gm, ctx)


def test_annotation_keeps_io_layers_and_patterns(tiny):
    _, gm = tiny
    gm = Pipeline([CanonicalizeAttention(), _annotate(keep_fp=("cq",))]).run(gm, PassContext())
    annotated = {n.meta[LAYER_KEY].path for n in gm.graph.nodes if QUANT_KEY in n.meta}
    # conv (first layer on the sample) and out (last layer) stay full precision, as does the pattern's cq
    assert annotated == {"time", "to_q", "to_k", "to_v", "ck", "cv", "", "@1"}  # the two attentions of the top module
    with pytest.raises(PassError, match="'nothing.here' matches no layer"):
        Pipeline([CanonicalizeAttention(), _annotate(keep_fp=("nothing.here",))]).run(tiny[1], PassContext())


def test_observers_record_per_timestep_and_change_nothing(tiny):
    model, gm = tiny
    ctx = PassContext()
    gm = _prepared(gm, ctx)
    observers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("lowbit_observers")]
    # 7 linear inputs (conv and out kept) + q, k, v, probs of 2 attentions
    assert len(observers) == 7 + 8
    for t in (900.0, 100.0):
        inputs = tiny_inputs(t=t, seed=int(t))
        torch.testing.assert_close(gm(**inputs), model(**inputs))  # observers are side-effect only
    assert ctx.observations.timesteps("to_q:input") == [100.0, 900.0]
    probs = ctx.observations.overall("@1:probs")
    assert 0 <= probs.min and probs.max <= 1


def test_nan_in_calibration_names_node_and_timestep(tiny):
    _, gm = tiny
    gm = _prepared(gm, PassContext())
    bad = tiny_inputs(t=250.0)
    bad["text"][0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"ck:input \(node '.*'\) at timestep 250"):
        gm(**bad)


def test_mse_weight_range_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 0] = 12.0  # one outlier per channel: min-max wastes the grid on it
    spec = QuantSpec(4, granularity="channel", axis=0, symmetric=True)
    errors = {}
    for method in ("minmax", "mse"):
        p = weight_params(w, spec, method)
        errors[method] = (p.qvalues.float() * p.scale[:, None] - w).pow(2).mean().item()
        assert p.qvalues.dtype == torch.int8 and int(p.qvalues.min()) >= -8 and int(p.qvalues.max()) <= 7
    assert errors["mse"] < errors["minmax"]


def test_convert_emits_domain_ops_that_compute_the_reference(tiny):
    model, gm = tiny
    ctx = PassContext()
    gm = _prepared(gm, ctx)
    for t in (900.0, 100.0):
        gm(**tiny_inputs(t=t, seed=7))
    convert = Pipeline([ChooseQuantParams(), ConvertToQuantizedOps()])
    gm = convert.run(gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("lowbit.")]
    assert targets.count(lowbit.quantized_linear.default) == 7
    assert targets.count(lowbit.quantized_attention.default) == 2
    assert targets.count(lowbit.fake_quant.default) == 6
    assert not any(n.op == "call_module" and "observers" in n.target for n in gm.graph.nodes)
    assert not hasattr(gm.to_q, "weight")  # the float weight is no longer held by the graph
    assert model.to_q.weight.dtype == torch.float32  # ...and the user's model is untouched

    # numerical check of one layer against the quantization formula by hand
    p_in, p_w = ctx.params["to_q:input"], ctx.params["to_q:weight"]
    node = next(n for n in gm.graph.nodes if n.target == lowbit.quantized_linear.default and n.meta[LAYER_KEY].path == "to_q")
    x = torch.randn(2, 16, 8)
    row = 1  # timestep 900 sorts after 100
    s, z = p_in.scale[row], p_in.zero_point[row]
    xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    expected = torch.nn.functional.linear(xq, p_w.qvalues.float() * p_w.scale[:, None], model.to_q.bias)
    got = lowbit.quantized_linear(x, p_w.qvalues, p_w.scale, model.to_q.bias, s, z, 0, 255)
    torch.testing.assert_close(got, expected)
    assert node.meta["lowbit.created_by"] == "convert_to_quantized_ops"

    inputs = tiny_inputs(t=900.0, seed=8)
    rel = ((gm(**inputs) - model(**inputs)).norm() / model(**inputs).norm()).item()
    assert rel < 0.05  # W8A8 with ranges calibrated at this timestep: about 1% here


def test_per_timestep_scales_follow_the_timestep_input(tiny):
    _, gm = tiny
    ctx = PassContext()
    gm = _prepared(gm, ctx)
    for t in (900.0, 100.0):
        gm(**tiny_inputs(t=t, seed=9))
    params = ctx.params
    Pipeline([ChooseQuantParams()]).run(gm, ctx)
    time_in = ctx.params[target_name("time", "input")]
    assert time_in.timesteps.tolist() == [100.0, 900.0]
    assert time_in.scale[0] != time_in.scale[1]  # timestep/1000 spans different ranges
    assert params is ctx.params
