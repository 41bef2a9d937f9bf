"""The start-token split and the log2 probability quantizer in real graphs."""

import torch

import lowbit
from lowbit.ir.annotations import ATTENTION_KEY, QUANT_KEY
from lowbit.models.tiny import build
from lowbit.recipes import Recipe

lowbit_ops = torch.ops.lowbit


def _attention_nodes(qmodel):
    return [n for n in qmodel.graph_module.graph.nodes if n.target == lowbit_ops.quantized_attention.default]


def test_cross_attention_keeps_column_zero_and_self_attention_none(calib):
    recipe = Recipe("dgq-attn", 8, 8, attention_scheme="log2", start_token=True, dynamic_attention_scale=True)
    qmodel = lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)
    nodes = _attention_nodes(qmodel)
    by_kind = {n.meta[ATTENTION_KEY].kind: n for n in nodes}
    assert by_kind["cross"].meta[QUANT_KEY].start_token == 0 and by_kind["cross"].args[10] == 0
    assert by_kind["self"].meta[QUANT_KEY].start_token is None and by_kind["self"].args[10] == -1
    assert all(n.args[7] == "log2" and n.args[11] is True and n.args[5] is None for n in nodes)  # dynamic: no stored scale


def test_static_log2_scale_leaves_the_start_column_out(calib):
    recipe = Recipe("static-log2", 8, 8, attention_scheme="log2", start_token=True)
    qmodel = lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)
    params = qmodel.params["transformer_blocks.0.attn2:probs"]
    assert params.spec.scheme == "log2" and params.timesteps.numel() == 3
    assert torch.all(params.zero_point == 0) and torch.all(params.scale <= 1)


def test_each_part_switches_off_for_ablation(calib):
    samples = calib("pixart")
    off = lowbit.quantize(build("pixart"), Recipe("off", 8, 8), samples, progress=False)
    assert all(n.args[7] == "uniform" and n.args[10] == -1 and n.args[11] is False for n in _attention_nodes(off))
    only_split = lowbit.quantize(build("pixart"), Recipe("split", 8, 8, start_token=True), samples, progress=False)
    assert {n.args[10] for n in _attention_nodes(only_split)} == {-1, 0}
    assert all(n.args[7] == "uniform" for n in _attention_nodes(only_split))
