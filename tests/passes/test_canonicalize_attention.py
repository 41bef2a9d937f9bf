from collections import Counter

import pytest
import torch

from lowbit.ir.annotations import ATTENTION_KEY, CREATED_BY_KEY
from lowbit.ir.attention import parse_canonical_attention
from lowbit.ir.capture import capture, normalize_inputs
from lowbit.models.tiny import build
from lowbit.passes.base import PassContext
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.pipeline import Pipeline
from tests.passes.conftest import tiny_inputs

aten = torch.ops.aten


def _targets(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def test_both_forms_become_canonical_and_exact(tiny):
    model, gm = tiny
    before = _targets(gm)
    assert before[aten.scaled_dot_product_attention.default] == 1 and before[aten.baddbmm.default] == 1
    pipeline = Pipeline([CanonicalizeAttention()])
    gm = pipeline.run(gm, PassContext())
    after = _targets(gm)
    assert after[aten.scaled_dot_product_attention.default] == 0 and after[aten.baddbmm.default] == 0
    assert after[aten.softmax.int] == 2
    infos = [n.meta[ATTENTION_KEY] for n in gm.graph.nodes if ATTENTION_KEY in n.meta]
    kinds = sorted((i.kind, i.key_sources, i.key_lengths) for i in infos)
    assert kinds == [("cross", ("text",), (5,)), ("self", ("sample",), (16,))]
    for node in gm.graph.nodes:
        if ATTENTION_KEY in node.meta:
            ops = parse_canonical_attention(node)
            assert ops.output.target == aten.matmul.default
            assert node.meta[CREATED_BY_KEY] == "canonicalize_attention"
    inputs = tiny_inputs(seed=3)
    # float32 reassociation only (SDPA's CPU kernel sums in another order)
    torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)
    assert pipeline.records[0].modified and len(pipeline.records[0].removed) >= 2


def test_second_run_changes_nothing(tiny):
    _, gm = tiny
    gm = Pipeline([CanonicalizeAttention()]).run(gm, PassContext())
    assert not CanonicalizeAttention()(gm, PassContext()).modified


@pytest.mark.parametrize("name, expected", [
    ("sd-unet", {"self": 4, "cross": 4}),
    ("pixart", {"self": 2, "cross": 2}),
    ("sana", {"cross": 2}),  # Sana's self-attention is linear attention: no softmax to expose
    ("sd3", {"joint": 2}),
    ("flux", {"joint": 1, "self": 1}),  # the single-stream block attends over text and image jointly
])
def test_real_models(name, expected, calib):
    model = build(name)
    args, kwargs = calib(name)[0]
    gm = Pipeline([CanonicalizeAttention()]).run(capture(model, args, kwargs), PassContext())
    infos = [n.meta[ATTENTION_KEY] for n in gm.graph.nodes if ATTENTION_KEY in n.meta]
    assert dict(Counter(i.kind for i in infos)) == expected
    for info in infos:
        if info.kind in ("cross", "joint"):
            assert "encoder_hidden_states" in info.key_sources
    inputs = normalize_inputs(model, args, kwargs, "timestep")
    torch.testing.assert_close(gm(**inputs)[0], model(**kwargs, return_dict=False)[0], rtol=1e-4, atol=1e-5)
