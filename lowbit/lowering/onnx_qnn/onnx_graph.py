"""A small ONNX graph builder that stamps every node with where it came from.

Each node carries the fx node, the source op (aten or lowbit) and the lowbit layer it was
translated from, as ``metadata_props`` (``lowbit.fx_node``, ``lowbit.source_op``,
``lowbit.layer``), so that a node the HTP rejects can be traced back to the model. Initializer
names end in a hash of their content: graphs exported for different timesteps give identical
weights identical names (QNN shares them in one context binary) and different constants
different names.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

__all__ = ["IR_VERSION", "OPSET", "OnnxGraph", "PROVENANCE_KEYS", "content_name", "provenance"]

OPSET = 21  # QuantizeLinear/DequantizeLinear with int4/uint16, Gelu, GroupNormalization
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 is what opset 21 needs
PROVENANCE_KEYS = ("lowbit.fx_node", "lowbit.source_op", "lowbit.layer")


def provenance(node: onnx.NodeProto) -> dict[str, str]:
    """The fx node, source op and lowbit layer stamped on an ONNX node (empty if none)."""
    return {p.key: p.value for p in node.metadata_props if p.key in PROVENANCE_KEYS}


def content_name(hint: str, array: np.ndarray, tag: str = "", *context: np.ndarray) -> str:
    """``hint`` plus a hash of the array's bytes, dtype and shape (and of ``context`` arrays)."""
    digest = hashlib.sha1(array.tobytes() + (tag or str(array.dtype)).encode() + str(array.shape).encode())
    for extra in context:
        digest.update(np.ascontiguousarray(extra).tobytes())
    return f"{hint}__{digest.hexdigest()[:10]}"


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class OnnxGraph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()
        self._origin: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "_./:" else "_" for c in hint) or "t"
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name

    @contextmanager
    def origin(self, fx_node: str, source_op: str, layer: str):
        previous = self._origin
        self._origin = {"lowbit.fx_node": fx_node, "lowbit.source_op": source_op, "lowbit.layer": layer}
        try:
            yield
        finally:
            self._origin = previous

    def constant(self, value, hint: str = "const", dtype=None) -> str:
        array = _numpy(value)
        if dtype is not None:
            array = array.astype(dtype)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        name = content_name(hint, array)
        if name not in self.initializers:
            self._used.add(name)
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def int4_constant(self, values: torch.Tensor, hint: str, scale: np.ndarray) -> str:
        """A signed 4-bit initializer (ONNX INT4, packed two per byte by onnx), named by its values and
        the scale it is dequantized with (see ``integer_constant``)."""
        array = _numpy(values).astype(np.int8)
        if array.min() < -8 or array.max() > 7:
            raise ValueError(f"{hint}: values outside the int4 range [-8, 7]")
        name = content_name(hint, array, "int4", scale)
        if name not in self.initializers:
            self._used.add(name)
            self.initializers[name] = helper.make_tensor(name, TensorProto.INT4, array.shape, array.flatten().tolist())
        return name

    def integer_constant(self, values, hint: str, dtype, scale: np.ndarray) -> str:
        """An integer initializer behind a DequantizeLinear, named by its values *and* its scale:
        measured, the QNN EP makes one HTP tensor per initializer name and gives it the parameters of
        the first DequantizeLinear that reads it, so equal integers at two scales must not share a name."""
        array = _numpy(values).astype(dtype)
        name = content_name(hint, array, "", scale)
        if name not in self.initializers:
            self._used.add(name)
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def node(self, op_type: str, inputs: list[str], *, outputs: int = 1, hint: str | None = None,
             meta: dict[str, str] | None = None, **attrs) -> str | list[str]:
        stem = hint or op_type.lower()
        names = [self.fresh(f"{stem}" if outputs == 1 else f"{stem}_{i}") for i in range(outputs)]
        fx_node = self._origin.get("lowbit.fx_node", "")
        node = helper.make_node(op_type, inputs, names, name=self.fresh(f"{fx_node}/{op_type}" if fx_node else op_type), **attrs)
        for key, value in {**self._origin, **(meta or {})}.items():
            node.metadata_props.add(key=key, value=value)
        self.nodes.append(node)
        return names[0] if outputs == 1 else names

    def add_input(self, name: str, shape: tuple[int, ...], elem_type: int = TensorProto.FLOAT) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, value: str, name: str, shape: tuple[int, ...]) -> None:
        """Declare ``value`` a graph output called ``name`` (renaming the tensor everywhere)."""
        if value in self.initializers or any(i.name == value for i in self.inputs):
            raise ValueError(f"graph output {name!r} is a constant or an input; nothing computes it")
        for node in self.nodes:
            for field in (node.input, node.output):
                for i, tensor in enumerate(field):
                    if tensor == value:
                        field[i] = name
        self._used.add(name)
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))

    def model(self, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="lowbit")
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        return model
