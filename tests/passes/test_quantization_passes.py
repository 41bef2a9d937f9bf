"""annotate_quantization, insert_observers, choose_quant_params and convert_to_quantized_ops on the tiny graph."""

import pytest
import torch

from lowbit import quantize
from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.observers import observing
from lowbit.ir.precision import LayerOverride, Precision
from lowbit.ir.schema import FakeQuant, QuantizedAttention, QuantizedLinear, SelectTimestep, schema_class
from lowbit.ir.statistics import CalibrationError
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.base import PassContext, PassError
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.choose_quant_params import ChooseQuantParams, weight_params
from lowbit.passes.convert_to_quantized_ops import ConvertToQuantizedOps
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.pipeline import Pipeline
from tests.passes.conftest import TinyDenoiser, tiny_inputs

def _context(**precision) -> PassContext:
    """W8A8 with per-timestep activation ranges, as the recipes' default."""
    return PassContext(precision=Precision(8, 8, **precision))


def _prepared(gm, ctx):
    return Pipeline([CanonicalizeAttention(), AnnotateQuantization(), InsertObservers()]).run(gm, ctx)


def _converted(gm, ctx):
    return Pipeline([ChooseQuantParams(), ConvertToQuantizedOps()]).run(gm, ctx)


def test_annotation_keeps_io_layers_and_patterns(tiny):
    _, gm = tiny
    keep_cq = _context(layers=(LayerOverride("cq", keep_float=True),))
    gm = Pipeline([CanonicalizeAttention(), AnnotateQuantization()]).run(gm, keep_cq)
    annotated = {n.meta[LAYER_KEY].path for n in gm.graph.nodes if QUANT_KEY in n.meta}
    # conv (first layer on the sample) and out (last layer) stay full precision, as does the pattern's cq
    assert annotated == {"time", "to_q", "to_k", "to_v", "ck", "cv", "", "@1"}  # the two attentions of the top module
    with pytest.raises(PassError, match='layers."nothing.here" matches no layer'):
        Pipeline([CanonicalizeAttention(), AnnotateQuantization()]).run(
            tiny[1], _context(layers=(LayerOverride("nothing.here", keep_float=True),)))


def test_observers_record_per_step_and_change_nothing(tiny):
    model, gm = tiny
    ctx = _context()
    gm = _prepared(gm, ctx)
    observers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("lowbit_observers")]
    # 7 linear inputs (conv and out kept) + q, k, v, probs of 2 attentions
    assert len(observers) == 7 + 8
    for t in (900.0, 100.0):
        inputs = tiny_inputs(t=t, seed=int(t))
        with observing(gm, ctx.observations):
            torch.testing.assert_close(gm(**inputs), model(**inputs))  # observers are side-effect only
    assert ctx.observations.timesteps("to_q:input") == [100.0, 900.0]
    probs = ctx.observations.overall("@1:probs")
    assert 0 <= probs.min and probs.max <= 1


def test_nan_in_calibration_names_node_and_timestep(tiny):
    _, gm = tiny
    ctx = _context()
    gm = _prepared(gm, ctx)
    bad = tiny_inputs(t=250.0)
    bad["text"][0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"ck:input \(node '.*'\) at timestep 250"), observing(gm, ctx.observations):
        gm(**bad)


def test_mse_weight_range_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 0] = 12.0  # one outlier per channel: min-max wastes the grid on it
    spec = QuantSpec(4, granularity="channel", axis=0, symmetric=True)
    errors = {}
    for method in ("minmax", "mse"):
        p = weight_params(w, spec, method)
        errors[method] = (p.codes.float() * p.scale[:, None] - w).pow(2).mean().item()
        assert p.qvalues.dtype == torch.uint8 and p.qvalues.shape == (16, 32)  # packed two per byte
        assert int(p.codes.min()) >= -8 and int(p.codes.max()) <= 7
    assert errors["mse"] < errors["minmax"]


def test_convert_emits_domain_ops_that_compute_the_reference(tiny):
    model, gm = tiny
    ctx = _context()
    gm = _prepared(gm, ctx)
    with observing(gm, ctx.observations):
        for t in (900.0, 100.0):
            gm(**tiny_inputs(t=t, seed=7))
    gm = _converted(gm, ctx)
    schemas = [schema_class(n) for n in gm.graph.nodes]
    assert schemas.count(QuantizedLinear) == 7
    assert schemas.count(QuantizedAttention) == 2
    assert schemas.count(FakeQuant) == 6
    assert not any(n.op == "call_module" and "observers" in n.target for n in gm.graph.nodes)
    assert not hasattr(gm.to_q, "weight")  # the float weight is no longer held by the graph
    assert model.to_q.weight.dtype == torch.float32  # ...and the user's model is untouched

    node = next(n for n in gm.graph.nodes if schema_class(n) is QuantizedLinear and n.meta[LAYER_KEY].path == "to_q")
    assert node.meta["lowbit.created_by"] == "convert_to_quantized_ops"

    inputs = tiny_inputs(t=900.0, seed=8)
    rel = ((gm(**inputs) - model(**inputs)).norm() / model(**inputs).norm()).item()
    assert rel < 0.05  # W8A8 with ranges calibrated at this timestep: about 1% here


def _tiny_at(t: float, lo: float, hi: float, seed: int) -> dict:
    """The tiny model's inputs at timestep ``t`` with every text value in [lo, hi], both ends reached."""
    inputs = tiny_inputs(t=t, seed=seed)
    u = torch.rand(inputs["text"].shape, generator=torch.Generator().manual_seed(seed))
    text = lo + (hi - lo) * (0.1 + 0.8 * u)  # strictly inside the range...
    text[0, 0, 0], text[1, 4, 5] = lo, hi  # ...but for one minimum and one maximum
    inputs["text"] = text
    return inputs


def test_two_timesteps_each_get_the_range_of_their_own_calibration_data():
    torch.manual_seed(0)
    model = TinyDenoiser().eval()  # not the tiny fixture: lowbit.quantize captures the model itself
    # ck and cv read the text input directly: plant a narrow range at t=900 and a wide one at t=100
    calibration = [((), _tiny_at(900.0, -1.0, 3.0, seed=1)), ((), _tiny_at(100.0, -40.0, 10.0, seed=2))]
    qmodel = quantize(model, "minmax-w8a8", calibration, progress=False)
    # Asymmetric 8-bit min-max, codes 0..255: scale = (max - min) / 255, zero point = round(-min / scale).
    #   text at t=100, [-40, 10]: scale 50/255 = 0.196078, zero point round(40 * 255/50 = 204.0) = 204
    #   text at t=900, [-1, 3]:   scale 4/255 = 0.015686,  zero point round(1 * 255/4 = 63.75) = 64
    #   (ranges pooled over both timesteps would give t=900 the wide row: 0.196078 and 204)
    # The time layer reads timestep / 1000, one value per timestep; the range is widened to hold 0:
    #   t=100, [0, 0.1]: scale 0.1/255 = 0.000392, zero point 0;  t=900, [0, 0.9]: 0.9/255 = 0.003529, 0
    expected = {"ck:input": ([50 / 255, 4 / 255], [204, 64]), "cv:input": ([50 / 255, 4 / 255], [204, 64]),
                "time:input": ([0.1 / 255, 0.9 / 255], [0, 0])}
    for target, (scales, zero_points) in expected.items():
        params = qmodel.params[target]
        assert params.timesteps.tolist() == [100.0, 900.0], target  # one row per calibrated timestep, sorted
        # float32 arithmetic on the observed extremes: a few ulps (rtol 1e-6 is ~8 ulps)
        torch.testing.assert_close(params.scale, torch.tensor(scales), rtol=1e-6, atol=0,
                                   msg=lambda m: f"{target} scale rows {params.scale.tolist()}: {m}")
        assert params.zero_point.tolist() == zero_points, target

    # the converted ck layer reads its input scale from exactly that table, by the timestep input
    gm = qmodel.graph_module
    ck = next(n for n in gm.graph.nodes if schema_class(n) is QuantizedLinear and n.meta[LAYER_KEY].path == "ck")
    select = SelectTimestep.of(QuantizedLinear.of(ck).input_scale)
    torch.testing.assert_close(fetch_attr(gm, select.table.target), qmodel.params["ck:input"].scale, rtol=0, atol=0)
    assert select.timestep.op == "placeholder" and select.timestep.target == "timestep"


def test_quantizer_ops_match_values_worked_out_by_hand():
    x = torch.tensor([[-1.3, 0.26, 1.25, 9.0]])
    scale, zero_point = torch.tensor(0.5), torch.tensor(2.0)
    # Q(x) = (clamp(round(x / 0.5) + 2, 0, 15) - 2) * 0.5, rounding half to even:
    #   x / 0.5       = -2.6, 0.52, 2.5, 18
    #   round         = -3,   1,    2,   18   (2.5 -> 2: half to even; half away from zero gives 3)
    #   + 2, clamp    =  0,   3,    4,   15   (-1 -> 0 and 20 -> 15: both ends clip)
    #   - 2, * 0.5    = -1.0, 0.5,  1.0, 6.5
    xq = torch.tensor([[-1.0, 0.5, 1.0, 6.5]])
    torch.testing.assert_close(FakeQuant.overload()(x=x, scale=scale, zero_point=zero_point, qmin=0, qmax=15), xq,
                               rtol=0, atol=0)  # exact: the outputs are multiples of 0.5
    # y = Q(x) (W * s)^T + b with integer W and one scale per output channel:
    #   W * s = [[1, -2, 3, 0] * 0.1, [4, 0, -1, 2] * 0.5] = [[0.1, -0.2, 0.3, 0], [2, 0, -0.5, 1]]
    #   y0 = -1.0*0.1 + 0.5*(-0.2) + 1.0*0.3 + 6.5*0 + 0 = 0.1
    #   y1 = -1.0*2   + 0.5*0      + 1.0*(-0.5) + 6.5*1 + 1 = 5.0
    weight = torch.tensor([[1, -2, 3, 0], [4, 0, -1, 2]], dtype=torch.int8)
    y = QuantizedLinear.overload()(x=x, weight=weight, weight_scale=torch.tensor([0.1, 0.5]), bias=torch.tensor([0.0, 1.0]),
                                input_scale=scale, input_zero_point=zero_point, input_qmin=0, input_qmax=15)
    # 0.1 is not a float32: the products and sums are off by a few ulps of 0.1 (atol 1e-6)
    torch.testing.assert_close(y, torch.tensor([[0.1, 5.0]]), rtol=0, atol=1e-6)
