"""Pipeline ordering, stamping, verification and reporting."""

import pytest
import torch

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, CREATED_BY_KEY
from lowbit.ir.verify import IRError
from lowbit.passes.base import Pass, PassContext, PassError, PassResult
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.choose_quant_params import ChooseQuantParams
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.pipeline import HISTORY_KEY, Pipeline
from lowbit.passes.split_start_token import SplitStartToken


class _Corrupt(Pass):
    """Puts a wrong object under the quantization key of the first linear."""

    name = "corrupt"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if LAYER_KEY in n.meta)
        node.meta[QUANT_KEY] = "eight bits"
        return PassResult(gm, modified=True)


class _Liar(Pass):
    """Changes the graph but says it did not."""

    name = "liar"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(node):
            gm.graph.call_function(torch.ops.aten.clone.default, (node,))
        return PassResult(gm, modified=False)


def test_order_constraints_are_checked_before_running(tiny):
    _, gm = tiny
    with pytest.raises(PassError, match=r"'insert_observers' requires \['annotate_quantization'\]"):
        Pipeline([CanonicalizeAttention(), InsertObservers()]).run(gm, PassContext())
    assert gm.meta.get(HISTORY_KEY, []) == []  # nothing ran


def test_verifier_names_node_layer_and_pass(tiny):
    _, gm = tiny
    with pytest.raises(IRError, match=r"after pass 'corrupt': node '\w+' \(layer \w+\): meta\['lowbit.quant'\] must be a QuantAnnotation"):
        Pipeline([_Corrupt()]).run(gm, PassContext())


def test_modified_must_be_truthful(tiny):
    _, gm = tiny
    with pytest.raises(PassError, match="changed the graph or the context but reported modified=False"):
        Pipeline([_Liar()]).run(gm, PassContext())


class _Boaster(Pass):
    """Says it changed the graph but did nothing."""

    name = "boaster"

    def run(self, gm, ctx):
        return PassResult(gm, modified=True)


def test_modified_must_be_truthful_both_ways(tiny):
    _, gm = tiny
    with pytest.raises(PassError, match="pass 'boaster' reported modified=True but changed neither the graph nor the context"):
        Pipeline([_Boaster()]).run(gm, PassContext())


def test_must_run_before_names_both_passes(tiny):
    _, gm = tiny
    order = [CanonicalizeAttention(), AnnotateQuantization(), InsertObservers(), ChooseQuantParams(), SplitStartToken()]
    with pytest.raises(PassError, match=r"pass 'split_start_token' must run before \['choose_quant_params'\], but it comes earlier"):
        Pipeline(order).check_order([])
    with pytest.raises(PassError, match=r"'split_start_token' must run before \['choose_quant_params'\], but it already ran"):
        Pipeline([SplitStartToken()]).check_order(["canonicalize_attention", "annotate_quantization", "choose_quant_params"])
    with pytest.raises(PassError, match=r"'insert_observers' \(observe phase\) cannot follow 'choose_quant_params' \(decide phase\)"):
        Pipeline([ChooseQuantParams(), InsertObservers()]).check_order(["annotate_quantization", "insert_observers"])


def test_records_and_history(tiny):
    _, gm = tiny
    pipeline = Pipeline([CanonicalizeAttention()])
    gm = pipeline.run(gm, PassContext())
    record = pipeline.records[0]
    assert gm.meta[HISTORY_KEY] == ["canonicalize_attention"]
    assert record.added and all(
        n.meta[CREATED_BY_KEY] == "canonicalize_attention" for n in gm.graph.nodes if n.name in record.added
    )
    assert "canonicalize_attention: +" in pipeline.report()


def test_failing_pass_is_named_with_what_ran_before(tiny):
    class _Boom(Pass):
        name = "boom"

        def run(self, gm, ctx):
            raise RuntimeError("kaput")

    _, gm = tiny
    with pytest.raises(PassError, match=r"pass 'boom' failed \(after \['canonicalize_attention'\]\): kaput"):
        Pipeline([CanonicalizeAttention(), _Boom()]).run(gm, PassContext())
