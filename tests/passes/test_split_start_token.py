"""The start-token split and the log2 probability quantizer in real graphs."""

import torch

import lowbit
from lowbit.ir.annotations import ATTENTION_KEY, QUANT_KEY
from lowbit.ir.schema import QuantizedAttention, schema_class
from lowbit.models.tiny import build
from lowbit.recipes import Recipe



def _attention_nodes(qmodel) -> list[tuple[torch.fx.Node, QuantizedAttention]]:
    return [(n, QuantizedAttention.of(n)) for n in qmodel.graph_module.graph.nodes if schema_class(n) is QuantizedAttention]


def test_cross_attention_keeps_column_zero_and_self_attention_none(calib):
    recipe = Recipe.build("dgq-attn", 8, 8, attention_scheme="log2", dynamic_attention_scale=True).with_pass("split_start_token")
    qmodel = lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)
    nodes = _attention_nodes(qmodel)
    by_kind = {n.meta[ATTENTION_KEY].kind: (n, op) for n, op in nodes}
    cross, cross_op = by_kind["cross"]
    self_, self_op = by_kind["self"]
    assert cross.meta[QUANT_KEY].start_token == 0 and cross_op.start_token == 0
    assert self_.meta[QUANT_KEY].start_token is None and self_op.start_token == -1
    # dynamic: no stored scale
    assert all(op.probs_scheme == "log2" and op.dynamic_scale is True and op.probs_scale is None for _, op in nodes)


def test_static_log2_scale_leaves_the_start_column_out(calib):
    recipe = Recipe.build("static-log2", 8, 8, attention_scheme="log2").with_pass("split_start_token")
    qmodel = lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)
    params = qmodel.params["transformer_blocks.0.attn2:probs"]
    assert params.spec.scheme == "log2" and params.timesteps.numel() == 3
    assert torch.all(params.zero_point == 0) and torch.all(params.scale <= 1)


def test_each_part_switches_off_for_ablation(calib):
    samples = calib("pixart")
    off = lowbit.quantize(build("pixart"), Recipe.build("off", 8, 8), samples, progress=False)
    assert all(op.probs_scheme == "uniform" and op.start_token == -1 and op.dynamic_scale is False
               for _, op in _attention_nodes(off))
    only_split = lowbit.quantize(build("pixart"), Recipe.build("split", 8, 8).with_pass("split_start_token"), samples, progress=False)
    assert {op.start_token for _, op in _attention_nodes(only_split)} == {-1, 0}
    assert all(op.probs_scheme == "uniform" for _, op in _attention_nodes(only_split))
