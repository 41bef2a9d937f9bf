"""Make the emitted graph what the QNN HTP runs as integer ops, with no CPU fallback.

The HTP loads float ops too (in fp16, slow, and they skip lowbit's grids), so "no CPU fallback"
is not enough: every op must be a QDQ unit whose activation inputs and output have one width
(measured on the v79 HTP: uint8 in / uint16 out, or mixed-width inputs, turn the op into a float
island; MatMul alone takes a 16-bit first input with an 8-bit second one). The rules:

- Every float tensor gets one Q/DQ pair and every consumer reads the dequantized tensor. Its grid
  is (1) the lowbit quantizer's it reaches through relabelling ops (Reshape, Transpose, ...) when
  its producer can write that grid: a graph input (quantized on the host, exactly), or a Gemm /
  Conv whose input is 8-bit — so the query, key and value projections run as A8 layers and write
  the quantizer's uint8 grid directly, exactly as lowbit rounds it; (2) its input's grid, for ops
  that only move data; (3) uint16 over the calibrated range widened by ``MARGIN`` each side —
  for softmax inputs clipped below at the smallest row maximum minus ``SOFTMAX_FLOOR``.
- lowbit's quantizers then re-quantize a dequantized tensor (a Convert on the HTP): exact when
  it is already on their grid, otherwise rounded a second time (a 16-bit value to an 8-bit grid:
  at most 1 step off, for values within half a 16-bit step of an 8-bit rounding boundary).
- An op that needs 16 bits and reads an 8-bit tensor reads its exact 16-bit container:
  s (q - z) = (s / 256) (256 q - 256 z), one Convert.
- Weights of layers lowbit keeps in full precision: int16, symmetric, per output channel.
  Biases: int32 at scale input_scale * weight_scale. Norm weights: uint8 ones with int32 zero
  bias (the emitter moves any affine part to Mul/Add). Other constants: uint16 per tensor.
- Graph inputs and outputs are integer tensors (``quantized_io``): the host quantizes and
  dequantizes them in float32 with the grids recorded under ``IO_KEY`` in the model's metadata,
  so no float reaches the HTP, whose own float input conversion runs in fp16. A small 8-bit input
  travels in its 16-bit container (``step`` 256), which the HTP accepts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.lowering.onnx_qnn.calibrate import TensorRange, float_tensors
from lowbit.lowering.onnx_qnn.errors import LoweringError
from lowbit.lowering.onnx_qnn.onnx_graph import content_name, provenance
from lowbit.lowering.onnx_qnn.quantizers import QUANTIZER_KEY

__all__ = ["IO_KEY", "MARGIN", "SOFTMAX_FLOOR", "Grid", "legalize"]

IO_KEY = "lowbit.io"
MARGIN = 0.1  # of the calibrated range, each side: inputs a little outside calibration do not saturate
SOFTMAX_FLOOR = 20.0  # exp(-20) = 2e-9 of a row's largest weight
RELABEL = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
MOVES_DATA = RELABEL | {"Slice", "Gather", "Split", "Expand", "Tile", "Resize"}
WEIGHTED = {"Gemm", "Conv"}
NORMS = {"LayerNormalization", "InstanceNormalization"}
_PARAMETER_INPUTS = {"QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "Clip": {1, 2}, "Pad": {1, 2, 3},
                     "Resize": {1, 2, 3}, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4},
                     "Gather": {1}, "Split": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "ReduceMax": {1},
                     "ReduceMean": {1}, "ReduceSum": {1}, "Where": {0}}
_ADDITIVE = {"Add", "Sub", "Max", "Min", "Where"}
_ONNX_TYPE = {np.uint8: TensorProto.UINT8, np.uint16: TensorProto.UINT16}
SMALL_8_BIT_INPUT = 128  # measured: a uint8 graph input of 24-48 elements fails to finalize (MEM_ALLOC), 128+ loads


@dataclass(eq=False)
class Grid:
    """The parameters of one Q/DQ pair."""

    scale: float
    zero_point: int
    dtype: type

    @classmethod
    def from_range(cls, lo: float, hi: float) -> Grid:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 65535.0, 1e-12)
        return cls(scale, int(np.clip(round(-lo / scale), 0, 65535)), np.uint16)

    @property
    def bits(self) -> int:
        return 8 if self.dtype == np.uint8 else 16

    def container(self) -> Grid:
        """The 16-bit grid holding this 8-bit grid's values exactly."""
        return Grid(self.scale / 256.0, self.zero_point * 256, np.uint16)

    def key(self) -> tuple:
        return (self.scale, self.zero_point, self.dtype)

    def describe(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": np.dtype(self.dtype).name}


def _calibrated(r: TensorRange, within: Grid | None) -> Grid:
    """16 bits over the calibrated range; ``within``: the lowbit grid that alone reads the tensor,
    beyond whose span (plus half a step) every value saturates anyway (a Log's -inf included)."""
    lo, hi = r.lo, r.hi
    if r.row_max_floor is not None:
        lo = max(lo, r.row_max_floor - SOFTMAX_FLOOR)
    pad = MARGIN * (hi - lo) if np.isfinite(hi - lo) else 0.0
    lo, hi = lo - pad, hi + pad
    if within is not None:
        top = 255 if within.dtype == np.uint8 else 65535
        lo = max(lo, (-0.5 - within.zero_point) * within.scale)
        hi = min(hi, (top + 0.5 - within.zero_point) * within.scale)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"the calibrated range [{r.lo}, {r.hi}] is not finite")
    return Grid.from_range(lo, hi)


class _Legalizer:
    def __init__(self, model: onnx.ModelProto, ranges: dict[str, TensorRange], fp_weight_bits: int):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.ranges, self.fp_weight_bits = ranges, fp_weight_bits
        self.init = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.new_init: dict[str, onnx.TensorProto] = {}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.grid_of: dict[str, Grid] = {}  # every dequantized activation -> its grid
        self.written: dict[str, Grid] = {}  # every op output -> the grid it is quantized to
        self.param_users: list[tuple[onnx.NodeProto, Grid]] = []
        self.lowbit: dict[int, Grid] = {}
        for node in self.graph.node:
            if node.op_type == "QuantizeLinear" and any(p.key == QUANTIZER_KEY for p in node.metadata_props):
                zp = self.init[node.input[2]]
                grid = Grid(float(self.init[node.input[1]]), int(zp), zp.dtype.type)
                self.lowbit[id(node)] = grid
                self.param_users.append((node, grid))
                for dq in self.consumers[node.output[0]]:
                    self.param_users.append((dq, grid))
                    self.grid_of[dq.output[0]] = grid

    # -- each activation's grid ------------------------------------------------------------

    def _wanted(self, tensor: str) -> Grid | None:
        """The one lowbit grid this tensor reaches through relabelling ops only, if any."""
        cons = self.consumers.get(tensor, [])
        if tensor in self.outputs or not cons:
            return None
        grids = [self.lowbit.get(id(c)) for c in cons]
        if all(g is not None for g in grids) and len({g.key() for g in grids}) == 1:
            return grids[0]
        if len(cons) == 1 and cons[0].op_type in RELABEL and cons[0].input[0] == tensor:
            return self._wanted(cons[0].output[0])
        return None

    def _choose(self, tensor: str) -> Grid:
        producer = self.producer.get(tensor)
        wanted = self._wanted(tensor)
        writes_8_bits = producer is None or (producer.op_type in WEIGHTED and self.grid_of[producer.input[0]].bits == 8)
        if wanted is not None and (wanted.bits == 16 or writes_8_bits):
            return wanted
        if producer is not None and producer.op_type in MOVES_DATA:
            return self.grid_of[producer.input[0]]
        if tensor not in self.ranges:
            raise self._error(tensor, "no calibrated range for this tensor")
        try:
            return _calibrated(self.ranges[tensor], wanted)
        except ValueError as err:
            raise self._error(tensor, str(err)) from err

    def _error(self, tensor: str, problem: str) -> LoweringError:
        node = self.producer.get(tensor)
        origin = provenance(node) if node is not None else {}
        return LoweringError(origin.get("lowbit.fx_node", tensor), origin.get("lowbit.source_op", node.op_type if node else "input"),
                             origin.get("lowbit.layer", "<graph input>"), problem,
                             "Calibrate with inputs that exercise every layer of the exported timestep")

    def _qdq(self, tensor: str, grid: Grid, origin: onnx.NodeProto | None, suffix: str = "") -> tuple[list[onnx.NodeProto], str]:
        q_out, dq_out = f"{tensor}__q{suffix}", f"{tensor}__dq{suffix}"
        q = helper.make_node("QuantizeLinear", [tensor, "", ""], [q_out], name=f"{q_out}/QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [q_out, "", ""], [dq_out], name=f"{dq_out}/DequantizeLinear")
        for node in (q, dq):
            for key, value in (provenance(origin) if origin is not None else {}).items():
                node.metadata_props.add(key=key, value=value)
            self.param_users.append((node, grid))
        self.grid_of[dq_out] = grid
        return [q, dq], dq_out

    def _quantize_activation(self, tensor: str) -> list[onnx.NodeProto]:
        grid = self._choose(tensor)
        producer = self.producer.get(tensor)
        readers = self.consumers.get(tensor, [])
        self.written[tensor] = grid
        if tensor in self.outputs:  # the graph output keeps its name on the dequantized tensor
            inner = f"{tensor}__float"
            producer.output[:] = [inner if o == tensor else o for o in producer.output]
            self.written[inner] = grid
            nodes, dq_out = self._qdq(inner, grid, producer)
            nodes[1].output[0] = tensor
            self.grid_of[tensor] = self.grid_of.pop(dq_out)
            return nodes
        nodes, dq_out = self._qdq(tensor, grid, producer)
        for consumer in readers:
            consumer.input[:] = [dq_out if i == tensor else i for i in consumer.input]
        self.consumers[dq_out] = list(readers)
        return nodes

    # -- one width per op --------------------------------------------------------------------

    def _needs_16_bits(self, node: onnx.NodeProto, index: int) -> bool:
        if node.op_type in MOVES_DATA:
            return False
        if node.op_type in WEIGHTED:
            return self.written[node.output[0]].bits == 16
        if node.op_type == "MatMul":
            return index == 0  # measured: 16-bit x 8-bit runs quantized, 8-bit x 16-bit does not
        return True

    def _match_widths(self, order: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        out: list[onnx.NodeProto] = []
        containers: dict[str, str] = {}
        for node in order:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                for i, name in enumerate(node.input):
                    grid = self.grid_of.get(name)
                    if grid is None or grid.bits == 16 or not self._needs_16_bits(node, i):
                        continue
                    if name not in containers:
                        nodes, containers[name] = self._qdq(name, grid.container(), self.producer.get(name), suffix="16")
                        out += nodes
                    node.input[i] = containers[name]
            out.append(node)
        return out

    # -- constants ---------------------------------------------------------------------------

    def _initializer(self, array: np.ndarray, hint: str) -> str:
        name = content_name(hint, array)
        if name not in self.new_init:
            self.new_init[name] = numpy_helper.from_array(array, name)
        return name

    def _dq_constant(self, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, hint: str) -> onnx.NodeProto:
        hint = hint.split("__")[0]
        scale = scale.astype(np.float32)
        # named by values and scale: the QNN EP gives one initializer the parameters of its first reader
        values_name = content_name(f"{hint}.{values.dtype.name}", values, "", scale)
        if values_name not in self.new_init:
            self.new_init[values_name] = numpy_helper.from_array(values, values_name)
        inputs = [values_name, self._initializer(scale, f"{hint}.scale"), self._initializer(zero_point, "zero_point")]
        attrs = {"axis": axis} if axis is not None else {}
        out = f"{inputs[0]}__{inputs[1].rsplit('__', 1)[1]}__dq"  # named by values and scale: equal constants share it
        return helper.make_node("DequantizeLinear", inputs, [out], name=f"{out}/DequantizeLinear", **attrs)

    def _weight(self, name: str) -> onnx.NodeProto:
        w = self.init[name].astype(np.float64)
        qmax = 2 ** (self.fp_weight_bits - 1) - 1
        dtype = np.int16 if self.fp_weight_bits > 8 else np.int8
        scale = np.maximum(np.abs(w).max(axis=tuple(range(1, w.ndim))), 1e-12) / qmax
        q = np.clip(np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax).astype(dtype)
        return self._dq_constant(q, scale, np.zeros(len(scale), dtype), 0, name)

    def _constant(self, name: str, finest: float = 0.0) -> onnx.NodeProto:
        """uint16 over [min(0, c), max(0, c)], no finer than ``finest`` (measured: Sana's 1e-15 added to
        a denominator, on a 1e-20 grid, made the HTP's Add wrong; on the output's grid it is a 0)."""
        c = self.init[name].astype(np.float64)
        grid = Grid.from_range(float(c.min(initial=0.0)), float(c.max(initial=0.0)))
        if grid.scale < finest:
            grid = Grid(finest, int(np.clip(round(-min(float(c.min()), 0.0) / finest), 0, 65535)), np.uint16)
        q = np.clip(np.round(c / grid.scale) + grid.zero_point, 0, 65535).astype(np.uint16)
        return self._dq_constant(q, np.asarray(grid.scale), np.asarray(grid.zero_point, np.uint16), None, name)

    def _norm_parameter(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto:
        """The HTP's quantized LayerNorm / InstanceNorm takes a uint8 weight and an int32 bias."""
        value = self.init[node.input[index]]
        if not np.all(value == (1.0 if index == 1 else 0.0)):
            raise self._error(node.output[0], "norm weights must be ones and biases zeros here (the emitter moves the affine part out)")
        if index == 1:
            return self._dq_constant(np.full(value.shape, 255, np.uint8), np.asarray(1 / 255), np.asarray(0, np.uint8), None, "norm_weight")
        return self._dq_constant(np.zeros(value.shape, np.int32), np.asarray(1e-6), np.asarray(0, np.int32), None, "norm_bias")

    def _bias(self, node: onnx.NodeProto, weight_dq: onnx.NodeProto) -> onnx.NodeProto:
        w_scale = self._array(weight_dq.input[1]).astype(np.float64).reshape(-1)
        scale = self.grid_of[node.input[0]].scale * w_scale
        q = np.round(self.init[node.input[2]].astype(np.float64) / scale)
        if np.abs(q).max(initial=0) >= 2 ** 31:
            raise self._error(node.output[0], "the bias does not fit int32 at scale input_scale * weight_scale")
        return self._dq_constant(q.astype(np.int32), scale, np.zeros(len(scale), np.int32), 0, node.input[2])

    def _array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.new_init[name]) if name in self.new_init else self.init[name]

    def _quantize_constants(self, order: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        out: list[onnx.NodeProto] = []
        made: dict[str, onnx.NodeProto] = {}
        producers = {o: n for n in order for o in n.output}
        for node in order:
            for i, name in enumerate(node.input):
                if name not in self.init or self.init[name].dtype != np.float32 or i in _PARAMETER_INPUTS.get(node.op_type, ()):
                    continue
                if node.op_type in WEIGHTED and i == 2:
                    dq = self._bias(node, producers[node.input[1]])
                elif node.op_type in WEIGHTED and i == 1:
                    dq = self._weight(name)
                elif node.op_type in NORMS:
                    dq = self._norm_parameter(node, i)
                elif node.op_type in _ADDITIVE:  # the constant need not be finer than the sum
                    dq = self._constant(name, finest=self.written[node.output[0]].scale)
                else:
                    dq = self._constant(name)
                if dq.output[0] not in made:  # equal constants share one DequantizeLinear
                    made[dq.output[0]] = dq
                    producers[dq.output[0]] = dq
                    out.append(dq)
                node.input[i] = dq.output[0]
            out.append(node)
        return out

    # -- integer graph inputs and outputs ---------------------------------------------------------

    def _quantize_io(self, order: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        io: dict[str, dict] = {}
        dropped: set[int] = set()
        added: list[onnx.NodeProto] = []
        for value in self.graph.input:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            q = next(n for n in order if n.op_type == "QuantizeLinear" and n.input[0] == value.name)
            grid = self.grid_of[f"{value.name}__dq"]
            size = int(np.prod([d.dim_value for d in value.type.tensor_type.shape.dim]))
            if grid.bits == 8 and size < SMALL_8_BIT_INPUT:
                # the host rounds to the 8-bit grid and sends it in its exact 16-bit container; the
                # graph's own Q then re-quantizes to 8 bits, exactly (the values are on the grid)
                wide = grid.container()
                dq = helper.make_node("DequantizeLinear", [value.name, "", ""], [f"{value.name}__container"],
                                      name=f"{value.name}__container/DequantizeLinear")
                self.param_users.append((dq, wide))
                q.input[0] = dq.output[0]
                added.append(dq)
                value.type.tensor_type.elem_type = TensorProto.UINT16
                io[value.name] = {**wide.describe(), "step": 256}
                continue
            for node in order:
                node.input[:] = [value.name if i == q.output[0] else i for i in node.input]
            dropped.add(id(q))
            value.type.tensor_type.elem_type = _ONNX_TYPE[grid.dtype]
            io[value.name] = grid.describe()
        for value in self.graph.output:
            dq = next(n for n in order if n.output[0] == value.name)
            q_out = dq.input[0]
            for node in order:
                node.input[:] = [f"{value.name}__dq" if i == value.name else i for i in node.input]
                node.output[:] = [value.name if o == q_out else o for o in node.output]
            dq.input[0], dq.output[0] = value.name, f"{value.name}__dq"
            if not any(dq.output[0] in n.input for n in order):
                dropped.add(id(dq))
            grid = self.grid_of[value.name]
            value.type.tensor_type.elem_type = _ONNX_TYPE[grid.dtype]
            io[value.name] = grid.describe()
        self.model.metadata_props.add(key=IO_KEY, value=json.dumps(io))
        return added + [n for n in order if id(n) not in dropped]

    # -- the whole pass ----------------------------------------------------------------------------

    def run(self, quantized_io: bool) -> onnx.ModelProto:
        floats = set(float_tensors(self.model))
        order: list[onnx.NodeProto] = []
        for value in self.graph.input:
            if value.name in floats:
                order += self._quantize_activation(value.name)
        for node in list(self.graph.node):
            order.append(node)
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                for out in node.output:
                    if out in floats:
                        order += self._quantize_activation(out)
        order = self._match_widths(order)
        order = self._quantize_constants(order)
        if quantized_io:
            order = self._quantize_io(order)
        for node, grid in self.param_users:
            node.input[1] = self._initializer(np.asarray(grid.scale, np.float32), "scale")
            node.input[2] = self._initializer(np.asarray(grid.zero_point, grid.dtype), "zero_point")
        del self.graph.node[:]
        self.graph.node.extend(order)
        used = {i for n in order for i in n.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + [t for name, t in self.new_init.items() if name in used and name not in self.init])
        return self.model


def legalize(model: onnx.ModelProto, ranges: dict[str, TensorRange], *, fp_weight_bits: int = 16,
             quantized_io: bool = True) -> onnx.ModelProto:
    """The QDQ graph the HTP runs as integer ops: see the module docstring for every choice."""
    return _Legalizer(model, ranges, fp_weight_bits).run(quantized_io)
