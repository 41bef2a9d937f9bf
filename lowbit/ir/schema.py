"""One schema per ``lowbit::`` op: its operands and static settings as a frozen, typed dataclass.

Every consumer of an op — its reference implementation, the CPU and Triton targets, the ONNX
lowering, passes, reports, tests — reads it through its schema, by field name:
``QuantizedLinear.of(node).input_qmax``. The torch signature of the op is generated from the
dataclass (field order and types), graph nodes carry their arguments as keywords, and this module
is the only place that relates a field to a position. Adding a field (a window mask, a CFG flag)
means adding it here and to the consumers that use it, nothing else.

Tensor fields hold whatever the consumer works on: fx nodes in a pass or a lowering, tensors in a
reference implementation or a kernel. Static fields are checked on construction.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.fx
from torch import Tensor

__all__ = [
    "SCHEMAS", "DynamicParams", "FakeQuant", "Log2FakeQuant", "OpSchema", "QuantizedAttention", "QuantizedConv2d", "QuantizedLinear",
    "SelectTimestep", "schema_class", "schema_of",
]

S = TypeVar("S", bound="OpSchema")

_TORCH_TYPES = {Tensor: "Tensor", int: "int", float: "float", bool: "bool", str: "str"}


def _torch_type(hint: Any) -> str:
    """The torch schema type of a field's annotation (``Tensor | None`` -> ``Tensor?``)."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _torch_type(inner) + "?"
    if typing.get_origin(hint) is tuple:
        return _torch_type(args[0]) + "[]"
    return _TORCH_TYPES[hint]


@dataclass(frozen=True)
class OpSchema:
    """Base of the op schemas: subclasses are frozen dataclasses and set ``NAME``."""

    NAME: ClassVar[str]

    @classmethod
    def torch_schema(cls) -> str:
        """The op's signature for ``torch.library``, in field order."""
        hints = typing.get_type_hints(cls)
        fields = ", ".join(f"{_torch_type(hints[f.name])} {f.name}" + ("" if f.default is dataclasses.MISSING else f"={f.default}")
                           for f in dataclasses.fields(cls))
        return f"({fields}) -> Tensor"

    @classmethod
    def overload(cls) -> torch._ops.OpOverload:
        """The registered op (``lowbit.ir`` registers every op when it is imported, in ``ops.py``)."""
        return getattr(torch.ops.lowbit, cls.NAME).default

    @classmethod
    def from_call(cls: type[S], *args: Any, **kwargs: Any) -> S:
        """The schema of one call of the op, however its arguments were passed."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**dict(zip(names, args)), **kwargs)

    @classmethod
    def of(cls: type[S], node: torch.fx.Node) -> S:
        """The schema of a graph node of this op (its fields are fx nodes and constants)."""
        if node.op != "call_function" or node.target != cls.overload():
            raise TypeError(f"node '{node.name}' calls {node.target}, not lowbit::{cls.NAME}")
        return cls.from_call(*node.args, **node.kwargs)

    @classmethod
    def define(cls, qualname: str, body: Callable[..., Tensor]) -> Any:
        """Register the op ``qualname`` ("lowbit::fake_quant", or a target's own variant) with this
        schema's signature: torch calls it positionally, ``body`` gets the arguments by name."""
        op = torch.library.custom_op(qualname, lambda *args: body(**cls.from_call(*args).kwargs()), mutates_args=(),
                                     schema=cls.torch_schema())
        op.register_fake(lambda *args: cls.from_call(*args).empty_output())
        return op

    def empty_output(self) -> Tensor:
        """An uninitialised output of the right shape and dtype (the op's shape rule)."""
        raise NotImplementedError

    def kwargs(self) -> dict[str, Any]:
        """The op's arguments by name (shallow: tensors and nodes are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    def emit(self, graph: torch.fx.Graph) -> torch.fx.Node:
        """A node calling the op with these arguments, by keyword, with its fake value."""
        from lowbit.ir.graph_edit import call

        return call(graph, self.overload(), (), self.kwargs())


def _check_range(owner: str, qmin: int, qmax: int) -> None:
    if not (isinstance(qmin, int) and isinstance(qmax, int)) or qmin > qmax:
        raise ValueError(f"{owner}: the integer range [{qmin}, {qmax}] must be two ints with qmin <= qmax")


@dataclass(frozen=True)
class FakeQuant(OpSchema):
    """Uniform quantize-dequantize (DGQ eq. 1) of ``x`` onto [qmin, qmax]."""

    NAME: ClassVar[str] = "fake_quant"
    x: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        _check_range(self.NAME, self.qmin, self.qmax)

    def empty_output(self) -> Tensor:
        return torch.empty_like(self.x)


@dataclass(frozen=True)
class Log2FakeQuant(OpSchema):
    """Log2 quantize-dequantize (DGQ eq. 2) with ``levels`` codes below ``scale``."""

    NAME: ClassVar[str] = "log2_fake_quant"
    x: Tensor
    scale: Tensor
    levels: int

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise ValueError(f"{self.NAME}: needs at least 2 levels, got {self.levels}")

    def empty_output(self) -> Tensor:
        return torch.empty_like(self.x)


@dataclass(frozen=True)
class DynamicParams(OpSchema):
    """The asymmetric ``field`` ("scale" or "zero_point") of [qmin, qmax] over the min-max range of
    ``x`` itself, computed at run time (LiteVAR's dynamic quantization): one per token (each vector
    along the last axis; output (..., 1)) or one for the whole tensor (output 0-d)."""

    NAME: ClassVar[str] = "dynamic_params"
    x: Tensor
    qmin: int
    qmax: int
    per_token: bool
    field: str

    def __post_init__(self) -> None:
        _check_range(self.NAME, self.qmin, self.qmax)
        if self.field not in ("scale", "zero_point"):
            raise ValueError(f"{self.NAME}: field must be 'scale' or 'zero_point', got {self.field!r}")

    def empty_output(self) -> Tensor:
        shape = (*self.x.shape[:-1], 1) if self.per_token else ()
        return self.x.new_empty(shape, dtype=torch.float32)


@dataclass(frozen=True)
class SelectTimestep(OpSchema):
    """The row of a per-step parameter ``table`` for the calibrated step nearest to ``timestep``."""

    NAME: ClassVar[str] = "select_timestep"
    table: Tensor
    timesteps: Tensor
    timestep: Tensor

    def empty_output(self) -> Tensor:
        return self.table.new_empty(self.table.shape[1:])


@dataclass(frozen=True)
class _WeightedOp(OpSchema):
    """What a quantized linear and convolution share: an integer ``weight`` with a per-output-channel
    ``weight_scale``, and an input quantizer (``input_scale`` None: not quantized) on its own range."""

    x: Tensor
    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    input_scale: Tensor | None
    input_zero_point: Tensor | None
    input_qmin: int
    input_qmax: int

    def __post_init__(self) -> None:
        _check_range(self.NAME, self.input_qmin, self.input_qmax)

    @property
    def input_levels(self) -> int:
        return self.input_qmax - self.input_qmin + 1


@dataclass(frozen=True)
class QuantizedLinear(_WeightedOp):
    """y = Q(x) Ŵᵀ + b."""

    NAME: ClassVar[str] = "quantized_linear"

    def empty_output(self) -> Tensor:
        return self.x.new_empty((*self.x.shape[:-1], self.weight.shape[0]))


@dataclass(frozen=True)
class QuantizedConv2d(_WeightedOp):
    """2-D convolution of Q(x) with an integer weight."""

    NAME: ClassVar[str] = "quantized_conv2d"
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("stride", "padding", "dilation"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{self.NAME}: {name} must have two entries, got {getattr(self, name)}")

    def empty_output(self) -> Tensor:
        (h, w), (kh, kw) = self.x.shape[-2:], self.weight.shape[-2:]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return self.x.new_empty((*self.x.shape[:-3], self.weight.shape[0], oh, ow))


@dataclass(frozen=True)
class QuantizedAttention(OpSchema):
    """softmax(q kᵀ · scale + mask) V with quantized probabilities.

    ``probs_scheme`` "none" keeps them, "uniform" or "log2" quantizes them on [probs_qmin,
    probs_qmax]; ``start_token`` >= 0 keeps that key column in full precision (DGQ eq. 9);
    ``dynamic_scale`` takes the scale from the probabilities at run time (eq. 8), with no stored
    ``probs_scale``. ``window_widths`` (heads, parts) and ``window_lengths`` (the parts' token counts
    (parts,), or their grids (parts, 2) for 2-D windows) are LiteVAR's multi-diagonal windows at
    this step (``lowbit.ir.attention_windows``): entries outside them are
    masked (-inf) before the softmax; None attends everywhere the mask allows. ``shared_half`` 0 or 1
    computes the attention for that half of the batch only (a CFG batch's conditional half) and gives
    its output to both halves (LiteVAR's ASC); -1 computes every sample.
    """

    NAME: ClassVar[str] = "quantized_attention"
    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None
    scale: float
    probs_scale: Tensor | None
    probs_zero_point: Tensor | None
    probs_scheme: str
    probs_qmin: int
    probs_qmax: int
    start_token: int
    dynamic_scale: bool
    window_widths: Tensor | None = None
    window_lengths: Tensor | None = None
    shared_half: int = -1

    def __post_init__(self) -> None:
        if self.shared_half not in (-1, 0, 1):
            raise ValueError(f"{self.NAME}: shared_half is 0, 1 (the half computed) or -1 (none), got {self.shared_half}")
        if (self.window_widths is None) != (self.window_lengths is None):
            raise ValueError(f"{self.NAME}: window_widths and window_lengths come together")
        if self.probs_scheme not in ("none", "uniform", "log2"):
            raise ValueError(f"{self.NAME}: probs_scheme must be 'none', 'uniform' or 'log2', got {self.probs_scheme!r}")
        _check_range(self.NAME, self.probs_qmin, self.probs_qmax)
        if self.start_token < -1:
            raise ValueError(f"{self.NAME}: start_token is a column index or -1, got {self.start_token}")

    @property
    def quantizes_probs(self) -> bool:
        return self.probs_scheme != "none"

    @property
    def windowed(self) -> bool:
        return self.window_widths is not None

    def empty_output(self) -> Tensor:
        return self.q.new_empty((*self.q.shape[:-1], self.v.shape[-1]))


SCHEMAS: tuple[type[OpSchema], ...] = (FakeQuant, Log2FakeQuant, DynamicParams, SelectTimestep, QuantizedLinear,
                                        QuantizedConv2d, QuantizedAttention)


def schema_class(node: torch.fx.Node) -> type[OpSchema] | None:
    """The schema class of a ``lowbit::`` op node, or None for any other node."""
    if node.op == "call_function" and getattr(node.target, "namespace", None) == "lowbit":
        return next((cls for cls in SCHEMAS if node.target == cls.overload()), None)
    return None


def schema_of(node: torch.fx.Node) -> OpSchema | None:
    """The schema of a ``lowbit::`` op node (fields: fx nodes and constants), or None."""
    cls = schema_class(node)
    return cls.of(node) if cls is not None else None
