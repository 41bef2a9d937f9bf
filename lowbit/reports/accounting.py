"""Compute and storage cost: FLOPs, BOPs and model size, as DGQ's Table 2 reports them.

BOPs are FLOPs · b_w · b_a (DGQ §4.1): a full-precision layer counts 32 · 32, a W8A8 layer 8 · 8,
an attention matmul the bits of its two operands. They are counted by running the graph once on
given inputs (an fx Interpreter reads the real shapes), per denoiser call. Model size counts
integer weights at their bit-width and every other tensor at its storage size, the quantization
parameters included. Group parameters count as a deployment stores them — K scales and zero
points per timestep plus a one-byte group label per vector (none for K = 1) — not as the per-vector tables the
reference ops broadcast; ``quant_param_bytes`` is that part alone (DGQ: 2.29 MB for SD-1.4 at
25 steps x 16 groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from lowbit.ir.annotations import QUANT_KEY
from lowbit.ir.artifacts import Artifact
from lowbit.ir.attention_windows import ATTENTION_WINDOWS
from lowbit.ir.cfg_sharing import CFG_SHARING
from lowbit.ir.packed_weights import unpacked_shape
from lowbit.ir.capture import capture, normalize_inputs
from lowbit.ir.schema import QuantizedAttention, QuantizedConv2d, QuantizedLinear, schema_class
from lowbit.core.quantized_model import QuantizedModel

__all__ = ["Cost", "attention_saved", "cost", "costs"]

aten = torch.ops.aten
FP_BITS = 32.0


@dataclass(frozen=True)
class Cost:
    flops: float  # per denoiser call on the given inputs
    bops: float
    size_bytes: float
    quant_param_bytes: float  # scales, zero points, timestep tables, group labels


def _bits(spec) -> float:
    return FP_BITS if spec is None else float(spec.bits)


class _Counter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.flops = self.bops = 0.0

    def _add(self, flops: float, w_bits: float, a_bits: float) -> None:
        self.flops += flops
        self.bops += flops * w_bits * a_bits

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.op != "call_function":
            return out
        annotation = n.meta.get(QUANT_KEY)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        schema = schema_class(n)
        op = schema.from_call(*args, **kwargs) if schema is not None else None
        if isinstance(op, (QuantizedLinear, QuantizedConv2d)) or n.target in (aten.linear.default, aten.conv2d.default):
            weight = op.weight if op is not None else args[1]  # aten.linear/conv2d(input, weight, ...)
            flops = 2.0 * out.numel() * math.prod(unpacked_shape(weight)[1:])
        elif n.target in (aten.matmul.default, aten.bmm.default, aten.baddbmm.default):
            a = args[1 if n.target == aten.baddbmm.default else 0]  # baddbmm(bias, a, b)
            self._add(2.0 * out.numel() * a.shape[-1], FP_BITS, FP_BITS)
            return out
        elif isinstance(op, QuantizedAttention) or n.target == aten.scaled_dot_product_attention.default:
            q, k, v = (op.q, op.k, op.v) if op is not None else args[:3]  # sdpa(query, key, value, ...)
            computed = 0.5 if op is not None and op.shared_half >= 0 else 1.0  # ASC: one half of the CFG batch
            scores = computed * 2.0 * q.numel() * k.shape[-2]
            mix = computed * 2.0 * out.numel() * v.shape[-2]
            if annotation is None:
                self._add(scores + mix, FP_BITS, FP_BITS)
            else:
                self._add(scores, _bits(annotation.query), _bits(annotation.key))
                self._add(mix, _bits(annotation.probs), _bits(annotation.value))
            return out
        else:
            return out
        if annotation is None:
            self._add(flops, FP_BITS, FP_BITS)
        else:
            self._add(flops, _bits(annotation.weight), _bits(annotation.input))
        return out


def _stored_bytes(model: QuantizedModel) -> dict[int, float]:
    """Deployed size of the quantization tensors, by tensor identity."""
    stored: dict[int, float] = {}
    for p in model.params.values():
        for t in p.tensors().values():
            stored[id(t)] = t.numel() * t.element_size()
        if p.qvalues is not None:
            stored[id(p.qvalues)] = math.prod(unpacked_shape(p.qvalues)) * p.spec.bits / 8
        if p.spec.granularity == "group":
            rows, vectors = len(p.spec.groups), len(p.spec.groups[0])
            labels = rows * vectors if p.spec.num_groups > 1 else 0  # one group needs no labels
            stored[id(p.scale)] = rows * p.spec.num_groups * 4 + labels  # K floats + labels per row
            stored[id(p.zero_point)] = rows * p.spec.num_groups * 4
    return stored


def _size(model: torch.nn.Module) -> tuple[float, float]:
    """(model size, of which quantization parameters other than the integer weights) in bytes."""
    tensors = [*model.parameters(), *model.buffers()]
    if not isinstance(model, QuantizedModel):
        return float(sum(t.numel() * t.element_size() for t in tensors)), 0.0
    stored = _stored_bytes(model)
    weights = {id(p.qvalues) for p in model.params.values() if p.qvalues is not None}
    size = sum(stored.get(id(t), t.numel() * t.element_size()) for t in tensors)
    return size, sum(stored[id(t)] for t in tensors if id(t) in stored and id(t) not in weights)


@torch.no_grad()
def cost(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, step_arg: str | None = "timestep") -> Cost:
    """FLOPs and BOPs of one call of ``model`` (full precision or quantized) and its size in bytes."""
    if isinstance(model, QuantizedModel):
        gm, reference = model.graph_module, model.original
    else:
        gm, reference = capture(model, args, kwargs, step_arg=step_arg), model
    inputs = normalize_inputs(reference, args, kwargs, step_arg)
    counter = _Counter(gm)
    counter.run(*gm.graph._codegen.process_inputs((), inputs))
    return Cost(counter.flops, counter.bops, *_size(model))


def costs(model: torch.nn.Module, calls: Iterable[tuple[tuple, dict]], *, step_arg: str | None = "timestep") -> list[Cost]:
    """:func:`cost` of each ``(args, kwargs)`` call. Costs depend on the input shapes only, so each
    distinct shape is counted once."""
    reference = model.original if isinstance(model, QuantizedModel) else model
    by_shape: dict[tuple, Cost] = {}
    out = []
    for args, kwargs in calls:
        inputs = normalize_inputs(reference, args, kwargs, step_arg)
        key = tuple((pytree.keystr(k), tuple(v.shape)) for k, v in pytree.tree_leaves_with_path(inputs) if isinstance(v, torch.Tensor))
        if key not in by_shape:
            by_shape[key] = cost(model, args, kwargs, step_arg=step_arg)
        out.append(by_shape[key])
    return out


def attention_saved(artifacts: dict[str, Artifact], block: int | None = None) -> float | None:
    """The fraction of one image's attention work (score entries, QKᵀ and PV alike) that MDWA's windows
    and ASC's sharing skip together: per layer and step, the entries the windows keep (every entry of a
    ``block`` x ``block`` tile holding one, if given), halved where the layer shares across CFG.
    None when the model has neither."""
    windows, sharing = artifacts.get(ATTENTION_WINDOWS), artifacts.get(CFG_SHARING)
    if windows is None and sharing is None:
        return None
    if windows is not None:
        kept, total = windows.entries(block)
    else:
        total = sharing.entries.double()
        kept = total.clone()
    if sharing is not None:
        if windows is not None and (windows.layers != sharing.layers or not torch.equal(windows.steps, sharing.steps)):
            raise ValueError("the windows and the CFG sharing were calibrated on different layers or steps")
        kept = kept * torch.where(sharing.shared, 0.5, 1.0).double()[:, None]
    return float(1.0 - kept.sum() / total.sum().clamp_min(1.0))
