"""The legalized graph keeps the HTP's rules: one width per op, lowbit's grids, integer I/O, and no
integer initializer read at two different scales. Checked on the DGQ reference graph (groups, log2
attention with the start-token column, run-time scales), without running the HTP."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from lowbit.lowering.onnx_qnn.legalize import IO_KEY
from lowbit.lowering.onnx_qnn.quantizers import QUANTIZER_KEY

_WIDTH = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}


@pytest.fixture(scope="module")
def dgq_graph(tmp_path_factory, quantized, reference_calibration):
    args, kwargs = reference_calibration[0]
    path = tmp_path_factory.mktemp("dgq") / "model.onnx"
    lowbit.export_onnx(quantized("dgq-w8a8"), args, kwargs, path, calibration=reference_calibration)
    return onnx.load(str(path))


def _widths(model):
    """Width of every dequantized activation: the zero point's dtype of the DQ that produces it."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in init:
            out[n.output[0]] = _WIDTH.get(init[n.input[2]].dtype)
    return out


def test_every_op_has_one_activation_width(dgq_graph):
    widths = _widths(dgq_graph)
    consumers = {}
    for n in dgq_graph.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    init = {i.name: numpy_helper.to_array(i) for i in dgq_graph.graph.initializer}
    checked = 0
    for n in dgq_graph.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [widths[i] for k, i in enumerate(n.input) if i in widths and not (n.op_type == "MatMul" and k == 1)]
        outs = [_WIDTH[init[q.input[2]].dtype] for o in n.output for q in consumers.get(o, []) if q.op_type == "QuantizeLinear"]
        assert len(set(ins + outs)) <= 1, f"{n.name} ({n.op_type}) mixes widths {ins} -> {outs}"
        checked += 1
    assert checked > 100


def test_lowbit_quantizers_keep_their_grids(dgq_graph, quantized):
    """Each lowbit uniform quantizer's Q carries a scale lowbit chose (DGQ: one per group)."""
    init = {i.name: numpy_helper.to_array(i) for i in dgq_graph.graph.initializer}
    scales = {float(s) for p in quantized("dgq-w8a8").params.values() if p.qvalues is None for s in p.scale.reshape(-1)}
    lowbit_q = [n for n in dgq_graph.graph.node if n.op_type == "QuantizeLinear"
                and any(p.key == QUANTIZER_KEY for p in n.metadata_props) and "log2" not in n.output[0]]
    assert len(lowbit_q) > 50
    for n in lowbit_q:
        assert any(np.isclose(float(init[n.input[1]]), s, rtol=1e-6) for s in scales), n.name
    assert any(n.output[0].startswith("q_log2") for n in dgq_graph.graph.node)  # DGQ's log2 attention quantizer


def test_no_integer_initializer_is_read_at_two_scales(dgq_graph):
    """The QNN EP gives an initializer the parameters of its first reader (measured: a shared -1
    constant became -10000); the exporter names integers by values and scale."""
    init = {i.name: numpy_helper.to_array(i) for i in dgq_graph.graph.initializer}
    readers = {}
    for n in dgq_graph.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init:
            readers.setdefault(n.input[0], set()).add(init[n.input[1]].tobytes())
    assert readers and all(len(s) == 1 for s in readers.values())


def test_inputs_and_outputs_are_integer_with_recorded_grids(dgq_graph):
    io = json.loads(next(p.value for p in dgq_graph.metadata_props if p.key == IO_KEY))
    for value in list(dgq_graph.graph.input) + list(dgq_graph.graph.output):
        assert value.type.tensor_type.elem_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16)
        assert io[value.name]["scale"] > 0
