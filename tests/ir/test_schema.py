"""Op schemas: the torch signature comes from the dataclass, nodes carry arguments by name only,
and the verifier refuses a lowbit op node built any other way."""

import dataclasses

import pytest
import torch
import torch.fx

from lowbit.ir.annotations import CREATED_BY_KEY, LAYER_KEY, LayerInfo
from lowbit.ir.schema import SCHEMAS, FakeQuant, QuantizedAttention, QuantizedConv2d, schema_of
from lowbit.ir.verify import IRError, verify


def test_signatures_follow_the_dataclasses():
    assert QuantizedConv2d.torch_schema() == (
        "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor? input_scale, Tensor? input_zero_point, "
        "int input_qmin, int input_qmax, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor")
    for schema in SCHEMAS:  # the registered op has exactly the schema's arguments, in its order
        names = [a.name for a in schema.overload()._schema.arguments]
        assert names == [f.name for f in dataclasses.fields(schema)]


def test_static_fields_are_checked():
    with pytest.raises(ValueError, match="probs_scheme must be 'none', 'uniform' or 'log2'"):
        QuantizedAttention(q=0, k=0, v=0, attn_mask=None, scale=1.0, probs_scale=None, probs_zero_point=None,
                           probs_scheme="log3", probs_qmin=0, probs_qmax=255, start_token=-1, dynamic_scale=False)
    with pytest.raises(ValueError, match=r"integer range \[5, 2\]"):
        FakeQuant(x=0, scale=0, zero_point=0, qmin=5, qmax=2)


def _graph(emit_by_keyword: bool) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x, s, z = (graph.placeholder(n) for n in ("x", "s", "z"))
    op = FakeQuant(x=x, scale=s, zero_point=z, qmin=0, qmax=255)
    node = graph.call_function(FakeQuant.overload(), (), op.kwargs()) if emit_by_keyword else \
        graph.call_function(FakeQuant.overload(), (x, s, z, 0, 255))
    node.meta[LAYER_KEY], node.meta[CREATED_BY_KEY] = LayerInfo("layer", "linear"), "test"
    graph.output(node)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_nodes_carry_arguments_by_name_and_the_verifier_enforces_it():
    gm = _graph(emit_by_keyword=True)
    verify(gm, "test")
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args == () and schema_of(node) == FakeQuant(**node.kwargs)
    x = torch.tensor([0.26, -1.0])
    torch.testing.assert_close(gm(x, torch.tensor(0.5), torch.tensor(2.0)), torch.tensor([0.5, -1.0]))
    with pytest.raises(IRError, match=r"must be called with exactly its schema's fields by keyword .* FakeQuant\(...\).emit"):
        verify(_graph(emit_by_keyword=False), "test")
