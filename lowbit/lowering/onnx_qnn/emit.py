"""Emit the ONNX graph of a specialized quantized graph: lowbit's numerics, nothing added.

Every runtime fx node is translated (aten_ops.py, lowbit_ops.py); constants become
initializers. The result computes exactly what lowbit's eager module computes — onnxruntime's
CPU provider runs it to within float rounding, which the tests check — with lowbit's quantizers
as Q/DQ pairs and its integer weights behind DequantizeLinear. Everything lowbit keeps in full
precision is still float here; ``legalize.py`` then makes the graph what the HTP accepts.

The choice of emitting ONNX from the fx graph ourselves rather than through
``torch.onnx.export(dynamo=True, custom_translation_table=...)``: the exporter re-traces the
graph and loses the fx node names and lowbit layer paths that error messages must give; it keeps
symbolic batch sizes that the HTP cannot take; and the timestep folding and the attention
decomposition would still need a graph walk of our own. The fx graph after export is aten-level
and small (about 40 distinct ops over the five diffusers families), so a table of translations
is short and every emitted node stays under our control.
"""

from __future__ import annotations

import operator

import onnx
import torch
import torch.fx
from onnx import TensorProto

from lowbit.ir.schema import schema_of
from lowbit.lowering.onnx_qnn.aten_ops import ATEN_TRANSLATIONS, MAX_RANK, bind
from lowbit.lowering.onnx_qnn.errors import LoweringError
from lowbit.lowering.onnx_qnn.lowbit_ops import LOWBIT_TRANSLATIONS
from lowbit.lowering.onnx_qnn.onnx_graph import OnnxGraph
from lowbit.lowering.onnx_qnn.specialize import SpecializedGraph, layer_of

__all__ = ["Emitter", "emit", "output_names"]


def output_names(count: int) -> list[str]:
    return [f"output_{i}" for i in range(count)]


class Emitter:
    """What a translation sees: the ONNX graph being built and the specialized fx graph."""

    def __init__(self, spec: SpecializedGraph, name: str):
        self.spec = spec
        self.graph = OnnxGraph(name)
        self.names: dict[torch.fx.Node, object] = {}
        self.views: dict[torch.fx.Node, tuple[str, tuple[int, ...]]] = {}

    def out(self, node: torch.fx.Node):
        return self.spec.values[node]

    def value(self, arg):
        return self.spec.value(arg)

    def hint(self, arg) -> str:
        """A readable initializer name: the parameter path for parameters, the node name otherwise."""
        if isinstance(arg, torch.fx.Node):
            return arg.target if arg.op == "get_attr" else arg.name
        return "const"

    def source(self, arg) -> tuple[str, tuple[int, ...]]:
        """For Reshape and Transpose only: an ONNX name and its physical shape, which differs from the
        fx shape for tensors of rank above ``MAX_RANK`` (kept as a lower-rank view of the same data)."""
        if isinstance(arg, torch.fx.Node) and arg in self.views:
            return self.views[arg]
        return self.tensor(arg), tuple(self.value(arg).shape)

    def tensor(self, arg) -> str:
        """The ONNX name of an argument: a runtime node's output, or an initializer for a constant."""
        if isinstance(arg, torch.fx.Node) and arg in self.views:
            raise LoweringError(arg.name, str(arg.target), layer_of(arg),
                                f"a rank-{self.value(arg).dim()} tensor is used by an op other than a reshape or a permutation",
                                f"The HTP takes tensors of rank <= {MAX_RANK}; rewrite the model's op on fewer dimensions")
        if isinstance(arg, torch.fx.Node) and arg in self.spec.runtime:
            name = self.names.get(arg)
            if not isinstance(name, str):
                raise LoweringError(arg.name, str(arg.target), layer_of(arg), "its output is not a single tensor",
                                    "Report the model: this is a gap in lowbit's QNN lowering")
            return name
        value = self.value(arg)
        if isinstance(value, (bool, int, float)):
            value = torch.tensor(float(value))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot make an ONNX constant of {type(value).__name__}")
        if value.is_floating_point() or value.dtype in (torch.int64, torch.int32):
            value = value.float()
        return self.graph.constant(value, self.hint(arg))


def _translate(em: Emitter, node: torch.fx.Node):
    if node.target is operator.getitem:
        return em.names[node.args[0]][node.args[1]]
    fn = ATEN_TRANSLATIONS.get(node.target) or LOWBIT_TRANSLATIONS.get(node.target)
    if fn is None:
        raise LoweringError(node.name, str(node.target), layer_of(node), "no QNN HTP translation for this op",
                            "Keep the layer out of the exported graph (quantize a submodule), or add a translation "
                            "to lowbit/lowering/onnx_qnn/aten_ops.py")
    with em.graph.origin(node.name, str(node.target), layer_of(node)):
        try:
            return fn(em, node, schema_of(node) or bind(node))
        except NotImplementedError as err:
            raise LoweringError(node.name, str(node.target), layer_of(node), str(err),
                                "This form of the op has no QNN translation yet") from err


def emit(spec: SpecializedGraph, name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    em = Emitter(spec, name)
    for input_name, value in spec.inputs.items():
        elem = TensorProto.BOOL if value.dtype == torch.bool else TensorProto.FLOAT
        em.names[next(n for n in spec.runtime if n.op == "placeholder" and n.name == input_name)] = \
            em.graph.add_input(input_name, tuple(value.shape), elem)
    for node in spec.graph_module.graph.nodes:
        if node.op == "call_function" and node in spec.runtime:
            em.names[node] = _translate(em, node)
        elif node in spec.runtime and node.op != "placeholder":
            raise LoweringError(node.name, node.op, layer_of(node), f"fx op kind {node.op!r} is not lowered",
                                "Capture the model with lowbit.quantize (torch.export), which yields call_function nodes only")
    outputs = spec.outputs
    for out_name, node in zip(output_names(len(outputs)), outputs):
        em.graph.add_output(em.tensor(node), out_name, tuple(spec.values[node].shape))
    return em.graph.model(metadata)
