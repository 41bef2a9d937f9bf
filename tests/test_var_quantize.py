"""VAR through the IR: per-scale calibration, LiteVAR's dynamic quantization, save/load/compile
on a VAR config that no shipped model uses."""

import pytest
import torch

import lowbit
from lowbit.ir.annotations import ATTENTION_KEY, QuantSpec
from lowbit.ir.ops import dynamic_params
from lowbit.ir.params import asymmetric
from lowbit.ir.schema import DynamicParams, schema_class
from lowbit.models.var import sample
from lowbit.recipes import get_recipe
from tests.conftest import small_var, var_calibration


def test_a_scales_ranges_come_from_that_scale_only():
    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    seen: dict[float, list[torch.Tensor]] = {}
    layer = step.blocks[1].ffn.fc2
    handle = layer.register_forward_pre_hook(lambda _, args: seen.setdefault(len(seen), args[0].clone()))
    for _, kwargs in calibration:  # the same inputs, run in full precision: scale i is call i
        step(**kwargs)
    handle.remove()
    qmodel = lowbit.quantize(step, "minmax-w8a8", calibration, step_arg="scale", progress=False)
    params = qmodel.params["blocks.1.ffn.fc2:input"]
    assert params.timesteps.tolist() == [0.0, 1.0, 2.0]
    spec = params.spec
    for i, x in seen.items():
        scale, zero_point = asymmetric(x.min().reshape(1), x.max().reshape(1), spec)
        torch.testing.assert_close(params.scale[i], scale[0], rtol=1e-6, atol=0)
        assert params.zero_point[i] == zero_point[0]
    assert len({round(float(s), 8) for s in params.scale}) == 3  # three scales, three different ranges


def test_cached_attention_is_its_own_kind():
    var, tokenizer, step = small_var()
    qmodel = lowbit.quantize(step, "minmax-w8a8", var_calibration(var, tokenizer, step), step_arg="scale", progress=False)
    # the converted graph keeps the canonical attention annotation on the quantized attention node
    infos = [n.meta[ATTENTION_KEY] for n in qmodel.graph_module.graph.nodes if ATTENTION_KEY in n.meta]
    assert [i.kind for i in infos] == ["cached", "cached"]
    assert infos[0].key_sources == ("past_keys_0", "hidden")


def test_dynamic_params_are_min_max_per_token():
    x = torch.tensor([[[-1.0, 0.5, 3.0], [0.2, 0.4, 0.6]]])
    scale = dynamic_params(x, 0, 255, True, "scale")
    zero_point = dynamic_params(x, 0, 255, True, "zero_point")
    # token 0 spans [-1, 3]: step 4/255, zero at round(255/4) = 64; token 1 spans [0, 0.6] (0 kept in range)
    torch.testing.assert_close(scale, torch.tensor([[[4 / 255], [0.6 / 255]]]))
    assert zero_point.flatten().tolist() == [64.0, 0.0]
    assert dynamic_params(x, 0, 255, False, "scale").shape == ()


def test_litevar_recipes_follow_the_papers_rows():
    r = get_recipe("litevar-w4a6")
    assert (r.precision.weight_bits, r.precision.activation_bits, r.precision.qkv_bits) == (4, 6, 8)
    assert r.precision.activation_mode == "dynamic" and not r.precision.quantize_probs
    assert get_recipe("litevar-w8a8-qkv16").precision.qkv_bits == 16
    assert {"litevar-w16a16-qkv16", "litevar-w8a8", "litevar-w4a4"} <= set(lowbit.recipes())


def test_litevar_quantizes_linear_inputs_q_k_per_token_and_v_per_tensor():
    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    qmodel = lowbit.quantize(step, "litevar-w8a8", calibration, step_arg="scale", progress=False)
    nodes = [n for n in qmodel.graph_module.graph.nodes if schema_class(n) is DynamicParams]
    per_token = [DynamicParams.of(n).per_token for n in nodes if DynamicParams.of(n).field == "scale"]
    linears = 2 * 5 + 2  # per block: mat_qkv, proj, fc1, fc2, ada_lin; head_nm.ada_lin and head
    assert per_token.count(True) == linears + 2 * 2 and per_token.count(False) == 2  # + Q, K per block; V per tensor
    assert not any(k.endswith(":input") for k in qmodel.params)  # nothing static was calibrated for activations
    assert QuantSpec(8, mode="dynamic", granularity="token", axis=-2) == qmodel.graph_module.graph.find_nodes(
        op="call_function", target=torch.ops.lowbit.quantized_linear.default)[0].meta["lowbit.quant"].input


def test_litevar_w16a16_is_lossless_and_w4a4_is_not():
    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    kwargs = calibration[-1][1]
    fp = step(**kwargs)[0]

    def error(recipe):
        out = lowbit.quantize(step, recipe, calibration, step_arg="scale", progress=False)(**kwargs)[0]
        return ((out - fp).norm() / fp.norm()).item()

    assert error("litevar-w16a16-qkv16") < 1e-3  # 16-bit grids: rounding far below fp32 noise in the logits
    assert error("litevar-w4a4") > 10 * error("litevar-w8a8")


def test_small_var_quantize_save_load_compile(tmp_path):
    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    labels, seeds = torch.tensor([3, 8]), [5, 6]
    qmodel = lowbit.quantize(step, "litevar-w8a8", calibration, step_arg="scale", progress=False)
    eager = sample(qmodel, var, tokenizer, labels, seeds)
    lowbit.save(qmodel, tmp_path / "litevar")
    loaded = lowbit.load(tmp_path / "litevar", step)
    assert torch.equal(sample(loaded, var, tokenizer, labels, seeds), eager)
    compiled = torch.compile(loaded, backend="lowbit")
    kwargs = calibration[-1][1]  # the last scale: a 16-token step over a 5-token cache
    want, got = loaded(**kwargs), compiled(**kwargs)
    # int8 GEMMs on per-token ranges sum exactly; fp32 rounding of a range can move a code by one
    assert all(((g - w).norm() / w.norm()).item() < 1e-3 for g, w in zip(got, want))


def test_small_var_exports_one_htp_graph_per_scale(tmp_path):
    from lowbit.evaluation.qnn import cfg_examples
    from lowbit.lowering.onnx_qnn import HTPDenoiser, export_schedule

    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    examples = cfg_examples(calibration, 2, "scale")
    dynamic = lowbit.quantize(step, "litevar-w8a8", calibration, step_arg="scale", progress=False)
    with pytest.raises(ValueError, match="no dynamic quantization.*activation_mode"):
        export_schedule(dynamic, examples, tmp_path / "refused", calibration=calibration)
    lowbit.save(lowbit.quantize(step, "minmax-w8a8", calibration, step_arg="scale", progress=False), tmp_path / "static")
    static = lowbit.load(tmp_path / "static", step)
    results = export_schedule(static, examples, tmp_path / "qnn", calibration=calibration, progress=False)
    assert [r.path.name for r in results] == ["t0.onnx", "t1.onnx", "t2.onnx"]
    htp = HTPDenoiser(tmp_path / "qnn", "scale")  # every scale's session loads with CPU fallback disabled
    for scale, kwargs in examples.items():  # scale 0's empty cache is folded out of its graph
        with torch.no_grad():
            got, want = htp(**kwargs), static(**kwargs)
        assert len(got) == len(want) == 1 + 2 * 2 and got[1].shape == want[1].shape  # logits, then the grown cache
        error = float((got[0] - want[0]).norm() / want[0].norm())
        assert error < 0.02, (scale, error)  # the HTP's 16-bit grids where lowbit keeps float; measured 0.001-0.006
