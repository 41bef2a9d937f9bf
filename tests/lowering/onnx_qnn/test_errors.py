"""Errors name the node, its op and the lowbit layer it came from, and say what to do."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.lowering.onnx_qnn import LoweringError


class CumsumNet(torch.nn.Module):
    """A linear whose output goes through an op the QNN lowering has no translation for."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.cumsum(self.proj(x), dim=1))


def test_an_op_without_translation_names_node_op_and_layer(tmp_path):
    torch.manual_seed(0)
    net = CumsumNet().eval()
    calibration = [((torch.randn(2, 4, 8),), {}) for _ in range(2)]
    qmodel = lowbit.quantize(net, lowbit.Recipe.build("w8a8", 8, 8, activation_mode="static", keep_io_layers=False),
                             calibration, step_arg=None, progress=False)
    with pytest.raises(LoweringError) as err:
        lowbit.export_onnx(qmodel, *calibration[0], tmp_path / "m.onnx")
    message = str(err.value)
    assert "cumsum" in message and "aten_ops.py" in message
    assert err.value.op == "aten.cumsum.default" and err.value.node.startswith("cumsum")


def test_a_node_left_to_the_cpu_is_named_with_its_lowbit_layer(tmp_path):
    """Erf has no HTP implementation (measured): verify_qnn must say which node and layer."""
    s, z = numpy_helper.from_array(np.float32(8 / 65535), "s"), numpy_helper.from_array(np.uint16(32768), "z")
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]),
             helper.make_node("Erf", ["xd"], ["e"], name="gelu_7/Erf"),
             helper.make_node("QuantizeLinear", ["e", "s", "z"], ["y"])]
    for key, value in (("lowbit.fx_node", "gelu_7"), ("lowbit.source_op", "aten.erf.default"), ("lowbit.layer", "blocks.3.ff")):
        nodes[1].metadata_props.add(key=key, value=value)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT16, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT16, [2, 8])], [s, z])
    path = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    report = lowbit.verify_qnn(path)
    assert not report.loaded and not report.ok
    erf = [m for m in report.misplaced if m.op == "Erf"]
    assert erf and erf[0].layer == "blocks.3.ff" and erf[0].fx_node == "gelu_7" and erf[0].where == "cpu"
    assert "blocks.3.ff" in "\n".join(report.lines())


def test_an_unknown_target_is_refused(tmp_path, quantized, reference_calibration):
    with pytest.raises(ValueError, match="qnn-htp"):
        lowbit.export_onnx(quantized("minmax-w8a8"), *reference_calibration[0], tmp_path / "m.onnx", target="tensorrt")
