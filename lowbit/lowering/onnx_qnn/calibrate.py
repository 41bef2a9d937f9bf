"""Ranges of the tensors lowbit keeps in full precision, for the HTP's 16-bit quantization.

The HTP runs integer tensors only (in a QDQ graph), so every tensor that lowbit leaves in float
— norms, residual sums, softmax inputs, the outputs of linear layers — needs a static range.
They are measured by running the emitted graph (lowbit's numerics, ``emit.py``) with
onnxruntime's CPU provider on the calibration inputs of the exported timestep. Non-finite values
(a Log of 0) are left out: they saturate at the range's end. Softmax inputs also record the smallest row maximum: a masked score (-10000 in diffusers) must not stretch the
range, since softmax only needs scores down to about 20 below each row's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

__all__ = ["TensorRange", "float_tensors", "tensor_ranges"]

_FLOAT = TensorProto.FLOAT


@dataclass
class TensorRange:
    lo: float
    hi: float
    row_max_floor: float | None = None  # for softmax inputs: the smallest maximum of any row

    def merge(self, other: TensorRange) -> TensorRange:
        floor = None if self.row_max_floor is None else min(self.row_max_floor, other.row_max_floor)
        return TensorRange(min(self.lo, other.lo), max(self.hi, other.hi), floor)


def float_tensors(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    names = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    return [n for n in names if types.get(n) == _FLOAT]


def tensor_ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, TensorRange]:
    """min/max of every float tensor over ``feeds`` (and row-max floors of softmax inputs)."""
    names = float_tensors(model)
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("Softmax", "LogSoftmax")}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    inputs = {i.name for i in probe.graph.input}
    for name in names:
        if name not in declared and name not in inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, _FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as emitted
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = [o.name for o in session.get_outputs()]
    ranges: dict[str, TensorRange] = {}
    for feed in feeds:
        values = dict(zip(fetch, session.run(fetch, feed)))
        values.update({k: v for k, v in feed.items() if k in names})
        for name in names:
            v = values[name]
            finite = v[np.isfinite(v)]
            if finite.size == 0:
                continue
            floor = float(v.max(axis=-1).min()) if name in softmax_inputs else None
            r = TensorRange(float(finite.min()), float(finite.max()), floor)
            ranges[name] = ranges[name].merge(r) if name in ranges else r
    return ranges
