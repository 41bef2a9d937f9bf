"""Translations of the aten ops that diffusers denoisers use, to plain (float) ONNX.

Shapes are static: every view, expand or slice reads its concrete output shape from the
specialized graph (``em.out(node)``), so symbolic sizes never reach ONNX. Ops that only move or
relabel data (views, dtype casts between float types, dropout in eval) produce no node. Runtime
integer inputs (an attention mask given as int64) are carried as float, which the HTP runs.
Quantization is added later (``legalize.py``); these translations only say what is computed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lowbit.lowering.onnx_qnn import layers

MAX_RANK = 5  # measured: Reshape and Transpose of rank 6 fall back to the CPU

__all__ = ["ATEN_TRANSLATIONS", "bind"]

aten = torch.ops.aten
ATEN_TRANSLATIONS: dict[object, Callable] = {}


def bind(node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _register(*targets):
    def wrap(fn):
        for t in targets:
            ATEN_TRANSLATIONS[t] = fn
        return fn
    return wrap


def _shape(em, values) -> str:
    return em.graph.constant(np.asarray(values, dtype=np.int64), "shape")


# -- no computation ------------------------------------------------------------------------

@_register(aten._assert_tensor_metadata.default)
def _no_value(em, node, a):
    return None


@_register(aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
           aten.lift_fresh_copy.default, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout,
           aten._to_copy.default, aten.type_as.default, aten.to.device)
def _identity(em, node, a):
    out = em.out(node)
    if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
        return em.graph.node("Cast", [em.tensor(node.args[0])], to=9)
    return em.tensor(node.args[0])


@_register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unflatten.int)
def _reshape(em, node, a):
    name, physical = em.source(node.args[0])
    shape = tuple(em.out(node).shape)
    if len(shape) > MAX_RANK:  # no node: a view of the same data, for the permutation that follows
        em.views[node] = (name, physical)
        return name
    return name if shape == physical else em.graph.node("Reshape", [name, _shape(em, shape)])


@_register(aten.expand.default, aten.expand_as.default)
def _expand(em, node, a):
    return em.graph.node("Expand", [em.tensor(a["self"]), _shape(em, em.out(node).shape)])


def _permutation(em, node, x_arg, perm: list[int]):
    """Transpose; above MAX_RANK, one Transpose of the axes larger than 1 if they are few enough,
    else a sequence of 4-D moves on merged axes (one per misplaced axis)."""
    name, physical = em.source(x_arg)
    shape = list(em.value(x_arg).shape)
    if len(shape) <= MAX_RANK:
        if tuple(shape) != physical:
            name = em.graph.node("Reshape", [name, _shape(em, shape)])
        return em.graph.node("Transpose", [name], perm=perm)
    kept = [d for d in range(len(shape)) if shape[d] > 1]  # size-1 axes do not change the data order
    if len(kept) <= MAX_RANK:
        squeezed = [shape[d] for d in kept]
        moved = em.graph.node("Transpose", [em.graph.node("Reshape", [name, _shape(em, squeezed)])],
                              perm=[kept.index(d) for d in perm if d in kept])
        em.views[node] = (moved, tuple(shape[d] for d in perm if d in kept))
        return moved
    order = list(range(len(shape)))
    for k, axis in enumerate(perm):
        m = order.index(axis)
        if m == k:
            continue
        dims = [order[:k], order[k:m], [order[m]], order[m + 1:]]
        merged = [int(np.prod([shape[d] for d in group])) for group in dims]
        name = em.graph.node("Transpose", [em.graph.node("Reshape", [name, _shape(em, merged)])], perm=[0, 2, 1, 3])
        physical = (merged[0], merged[2], merged[1], merged[3])
        order = order[:k] + [order[m]] + order[k:m] + order[m + 1:]
    em.views[node] = (name, physical)
    return name


@_register(aten.permute.default)
def _permute(em, node, a):
    rank = em.out(node).dim()
    return _permutation(em, node, a["self"], [d % rank for d in a["dims"]])


@_register(aten.transpose.int)
def _transpose(em, node, a):
    rank = em.out(node).dim()
    perm = list(range(rank))
    i, j = a["dim0"] % rank, a["dim1"] % rank
    perm[i], perm[j] = perm[j], perm[i]
    return _permutation(em, node, a["self"], perm)


@_register(aten.t.default)
def _t(em, node, a):
    return em.graph.node("Transpose", [em.tensor(a["self"])], perm=[1, 0])


@_register(aten.slice.Tensor)
def _slice(em, node, a):
    x = em.value(a["self"])
    dim = a["dim"] % x.dim()
    size = x.shape[dim]
    start, end, step = a["start"] or 0, a["end"], a["step"] or 1
    start = max(0, min(size, start + size if start < 0 else start))
    end = size if end is None else max(0, min(size, end + size if end < 0 else end))
    if start == 0 and end == size and step == 1:
        return em.tensor(a["self"])
    c = lambda v: _shape(em, [v])  # noqa: E731
    return em.graph.node("Slice", [em.tensor(a["self"]), c(start), c(end), c(dim), c(step)])


@_register(aten.select.int)
def _select(em, node, a):
    x = em.value(a["self"])
    dim = a["dim"] % x.dim()
    index = a["index"] % x.shape[dim]
    return em.graph.node("Gather", [em.tensor(a["self"]), em.graph.constant(np.asarray(index, np.int64), "index")], axis=dim)


@_register(aten.cat.default, aten.concat.default)
def _cat(em, node, a):
    tensors = [t for t in a["tensors"] if em.value(t).numel() > 0]
    rank = em.out(node).dim()
    return em.graph.node("Concat", [em.tensor(t) for t in tensors], axis=a["dim"] % rank)


@_register(aten.stack.default)
def _stack(em, node, a):
    rank = em.out(node).dim()
    dim = a["dim"] % rank
    parts = [em.graph.node("Unsqueeze", [em.tensor(t), _shape(em, [dim])]) for t in a["tensors"]]
    return em.graph.node("Concat", parts, axis=dim)


def _split(em, node, x_arg, sizes, dim):
    x = em.value(x_arg)
    dim = dim % x.dim()
    return em.graph.node("Split", [em.tensor(x_arg), _shape(em, sizes)], outputs=len(sizes), axis=dim) if len(sizes) > 1 else [em.tensor(x_arg)]


@_register(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _chunks(em, node, a):
    outs = em.out(node)
    dim = a.get("dim", 0)
    x = em.value(a["self"])
    sizes = [o.shape[dim % x.dim()] if node.target != aten.unbind.int else 1 for o in outs]
    names = _split(em, node, a["self"], sizes, dim)
    if node.target == aten.unbind.int:
        names = [em.graph.node("Reshape", [n, _shape(em, o.shape)]) for n, o in zip(names, outs)]
    return names


@_register(aten.repeat_interleave.self_int)
def _repeat_interleave(em, node, a):
    x = em.value(a["self"])
    dim = a["dim"]
    if dim is None:
        raise NotImplementedError("repeat_interleave without a dim")
    dim = dim % x.dim()
    index = np.repeat(np.arange(x.shape[dim]), int(a["repeats"]))
    return em.graph.node("Gather", [em.tensor(a["self"]), em.graph.constant(index.astype(np.int64), "index")], axis=dim)


@_register(aten.repeat.default)
def _repeat(em, node, a):
    x = em.value(a["self"])
    reps = list(a["repeats"])
    src = em.tensor(a["self"])
    if len(reps) > x.dim():
        src = em.graph.node("Reshape", [src, _shape(em, [1] * (len(reps) - x.dim()) + list(x.shape))])
    return em.graph.node("Tile", [src, _shape(em, reps)])


@_register(aten.einsum.default)
def _einsum(em, node, a):
    """Only the permutations diffusers use to unpatchify ("nhwpqc->nchpwq")."""
    equation = a["equation"].replace(" ", "")
    lhs, rhs = equation.split("->")
    if "," in lhs or sorted(lhs) != sorted(rhs):
        raise NotImplementedError(f"einsum {equation!r} is not a permutation")
    return _permutation(em, node, a["tensors"][0], [lhs.index(c) for c in rhs])


@_register(aten.constant_pad_nd.default, aten.pad.default)
def _pad(em, node, a):
    """Pad with zeros; any other value as a Concat of constant blocks (measured: the HTP's quantized
    Pad does not pad Sana's linear attention with the value 1.0 it asks for)."""
    if a.get("mode", "constant") != "constant":
        raise NotImplementedError(f"pad mode {a['mode']!r}")
    x = em.value(a["self"])
    pad, value = list(a["pad"]), float(a["value"] or 0.0)
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i in range(len(pad) // 2):
        begins[x.dim() - 1 - i], ends[x.dim() - 1 - i] = pad[2 * i], pad[2 * i + 1]
    if min(begins + ends) < 0:
        raise NotImplementedError("negative padding (cropping)")
    if value == 0.0:
        return em.graph.node("Pad", [em.tensor(a["self"]), _shape(em, begins + ends)])
    out, shape = em.tensor(a["self"]), list(x.shape)
    for axis in range(x.dim()):
        if begins[axis] or ends[axis]:
            block = lambda n: em.tensor(torch.full(shape[:axis] + [n] + shape[axis + 1:], value))  # noqa: E731
            parts = ([block(begins[axis])] if begins[axis] else []) + [out] + ([block(ends[axis])] if ends[axis] else [])
            out = em.graph.node("Concat", parts, axis=axis)
            shape[axis] += begins[axis] + ends[axis]
    return out


# -- elementwise ---------------------------------------------------------------------------

_NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}


def _binary(op_type: str, swap: bool = False):
    def translate(em, node, a):
        x, y = a["self"], a["other"]
        if a.get("alpha") not in (None, 1):
            y = em.value(y) * a["alpha"] if em.spec.is_constant(y) else None
            if y is None:
                raise NotImplementedError("alpha with a runtime operand")
        if not swap and em.spec.is_constant(y) and em.spec.is_runtime(x):
            c = torch.as_tensor(em.value(y)).float()
            if op_type in _NEUTRAL and bool(torch.all(c == _NEUTRAL[op_type])) and em.out(node).shape == em.value(x).shape:
                return em.tensor(x)  # x * 1, x / 1, x + 0: no node
        inputs = [_operand(em, node, y), _operand(em, node, x)] if swap else [_operand(em, node, x), _operand(em, node, y)]
        return em.graph.node(op_type, inputs)
    return translate


def _operand(em, node, arg) -> str:
    """A constant that spans two or more dims and is broadcast over others is stored at the output's
    full shape: measured on the HTP, Add or Mul of a (64, 128) constant onto a (2, 64, 128) tensor
    followed by LayerNorm computes every batch element after the first wrongly (20-70% error)."""
    if em.spec.is_constant(arg) and isinstance(em.value(arg), torch.Tensor):
        c, shape = em.value(arg), tuple(em.out(node).shape)
        if sum(d > 1 for d in c.shape) >= 2 and c.numel() < int(np.prod(shape)):
            return em.tensor(c.expand(shape).contiguous())
    return em.tensor(arg)


for _t_, _op_ in ((aten.add.Tensor, "Add"), (aten.add.Scalar, "Add"), (aten.sub.Tensor, "Sub"), (aten.sub.Scalar, "Sub"),
                  (aten.mul.Tensor, "Mul"), (aten.mul.Scalar, "Mul"), (aten.div.Tensor, "Div"), (aten.div.Scalar, "Div"),
                  (aten.pow.Tensor_Tensor, "Pow"), (aten.maximum.default, "Max"), (aten.minimum.default, "Min"),
                  (aten.gt.Tensor, "Greater"), (aten.gt.Scalar, "Greater"), (aten.lt.Tensor, "Less"), (aten.lt.Scalar, "Less"),
                  (aten.eq.Tensor, "Equal"), (aten.eq.Scalar, "Equal")):
    ATEN_TRANSLATIONS[_t_] = _binary(_op_)
ATEN_TRANSLATIONS[aten.rsub.Scalar] = _binary("Sub", swap=True)
ATEN_TRANSLATIONS[aten.rsub.Tensor] = _binary("Sub", swap=True)


@_register(aten.pow.Tensor_Scalar)
def _pow(em, node, a):
    if a["exponent"] == 2:
        x = em.tensor(a["self"])
        return em.graph.node("Mul", [x, x])
    return em.graph.node("Pow", [em.tensor(a["self"]), em.tensor(float(a["exponent"]))])


def _unary(op_type: str, **attrs):
    def translate(em, node, a):
        return em.graph.node(op_type, [em.tensor(node.args[0])], **attrs)
    return translate


for _t_, _op_ in ((aten.exp.default, "Exp"), (aten.sin.default, "Sin"), (aten.cos.default, "Cos"), (aten.sqrt.default, "Sqrt"),
                  (aten.neg.default, "Neg"), (aten.relu.default, "Relu"), (aten.sigmoid.default, "Sigmoid"),
                  (aten.tanh.default, "Tanh"), (aten.abs.default, "Abs"),
                  (aten.log.default, "Log"), (aten.logical_not.default, "Not")):
    ATEN_TRANSLATIONS[_t_] = _unary(_op_)


@_register(aten.reciprocal.default)
def _reciprocal(em, node, a):
    """Div(1, x): measured, the HTP's quantized Reciprocal is wrong (4.15 comes out as 1.66)."""
    return em.graph.node("Div", [em.tensor(1.0), em.tensor(a["self"])])


@_register(aten.rsqrt.default)
def _rsqrt(em, node, a):
    return em.graph.node("Div", [em.tensor(1.0), em.graph.node("Sqrt", [em.tensor(a["self"])])])


@_register(aten.silu.default)
def _silu(em, node, a):
    """x * Sigmoid(x); on a feature map (rank 4) the Sigmoid runs on a flat (batch, -1) view of x.
    Measured on the v79 HTP: Mul(x, Sigmoid(x)) of an NCHW tensor that a Reshape wrote (GroupNorm's
    way back from its groups, then any elementwise ops) and whose result feeds a Conv comes out wrong
    (SD-1.x UNet: half of every channel, relative error 0.98, and ~1.1 at the UNet's output); with
    the Sigmoid's operand and result reshaped apart it is exact to the 16-bit grids."""
    x = em.tensor(a["self"])
    shape = tuple(em.value(a["self"]).shape)
    if len(shape) != 4:
        return em.graph.node("Mul", [x, em.graph.node("Sigmoid", [x])])
    flat = em.graph.node("Reshape", [x, _shape(em, [shape[0], -1])])
    gate = em.graph.node("Reshape", [em.graph.node("Sigmoid", [flat]), _shape(em, shape)])
    return em.graph.node("Mul", [x, gate])


@_register(aten.gelu.default)
def _gelu(em, node, a):
    return em.graph.node("Gelu", [em.tensor(a["self"])], approximate=a["approximate"])


@_register(aten.softmax.int, aten._softmax.default)
def _softmax(em, node, a):
    return em.graph.node("Softmax", [em.tensor(a["self"])], axis=a["dim"])


@_register(aten.masked_fill.Scalar)
def _masked_fill(em, node, a):
    return em.graph.node("Where", [em.tensor(a["mask"]), em.tensor(float(a["value"])), em.tensor(a["self"])])


@_register(aten.where.self)
def _where(em, node, a):
    return em.graph.node("Where", [em.tensor(a["condition"]), em.tensor(a["self"]), em.tensor(a["other"])])


@_register(aten.clamp.default)
def _clamp(em, node, a):
    lo = em.tensor(float(a["min"])) if a["min"] is not None else ""
    hi = em.tensor(float(a["max"])) if a["max"] is not None else ""
    return em.graph.node("Clip", [em.tensor(a["self"]), lo, hi])


@_register(aten.clamp_min.default)
def _clamp_min(em, node, a):
    return em.graph.node("Clip", [em.tensor(a["self"]), em.tensor(float(a["min"]))])


# -- reductions and normalizations ---------------------------------------------------------

def _reduce(op_type: str):
    def translate(em, node, a):
        x = em.value(a["self"])
        dims = a["dim"] if a["dim"] is not None else list(range(x.dim()))
        dims = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
        return em.graph.node(op_type, [em.tensor(a["self"]), _shape(em, dims)], keepdims=int(bool(a["keepdim"])))
    return translate


ATEN_TRANSLATIONS[aten.mean.dim] = _reduce("ReduceMean")
ATEN_TRANSLATIONS[aten.sum.dim_IntList] = _reduce("ReduceSum")
ATEN_TRANSLATIONS[aten.amax.default] = _reduce("ReduceMax")


@_register(aten.linalg_vector_norm.default)
def _vector_norm(em, node, a):
    """The L2 norm as Sqrt(ReduceSum(x * x)) (VAR's L2-normalised queries and keys)."""
    if float(a["ord"]) != 2.0:
        raise ValueError(f"only the L2 norm has a translation, not ord={a['ord']}")
    x = em.tensor(a["self"])
    dims = [d % em.value(a["self"]).dim() for d in a["dim"]]
    squares = em.graph.node("ReduceSum", [em.graph.node("Mul", [x, x]), _shape(em, dims)], keepdims=int(bool(a["keepdim"])))
    return em.graph.node("Sqrt", [squares])


def _affine(em, out: str, weight, bias, shape) -> str:
    """y * weight + bias as Mul / Add (the HTP's quantized norms take unit weights only)."""
    if weight is not None and not bool(torch.all(em.value(weight) == 1)):
        out = em.graph.node("Mul", [out, em.tensor(em.value(weight).reshape(shape))])
    if bias is not None and not bool(torch.all(em.value(bias) == 0)):
        out = em.graph.node("Add", [out, em.tensor(em.value(bias).reshape(shape))])
    return out


@_register(aten.layer_norm.default)
def _layer_norm(em, node, a):
    shape = list(a["normalized_shape"])
    ones, zeros = em.tensor(torch.ones(shape)), em.tensor(torch.zeros(shape))
    out = em.graph.node("LayerNormalization", [em.tensor(a["input"]), ones, zeros], axis=-len(shape), epsilon=float(a["eps"]))
    return _affine(em, out, a["weight"], a["bias"], shape)


@_register(aten.rms_norm.default)
def _rms_norm(em, node, a):
    """x / sqrt(mean(x^2) + eps) * weight: onnxruntime's opset has no RMSNormalization before 23."""
    shape = list(a["normalized_shape"])
    x = em.tensor(a["input"])
    axes = _shape(em, list(range(-len(shape), 0)))
    mean_square = em.graph.node("ReduceMean", [em.graph.node("Mul", [x, x]), axes], keepdims=1)
    eps = a["eps"] if a["eps"] is not None else float(torch.finfo(em.value(a["input"]).dtype).eps)
    rms = em.graph.node("Sqrt", [em.graph.node("Add", [mean_square, em.tensor(float(eps))])])
    return _affine(em, em.graph.node("Div", [x, rms]), a["weight"], None, shape)


@_register(aten.group_norm.default)
def _group_norm(em, node, a):
    """InstanceNormalization over (batch, groups, rest): the HTP rejects GroupNormalization."""
    x = em.value(a["input"])
    groups = int(a["num_groups"])
    grouped = em.graph.node("Reshape", [em.tensor(a["input"]), _shape(em, [x.shape[0], groups, -1])])
    ones, zeros = em.tensor(torch.ones(groups)), em.tensor(torch.zeros(groups))
    normed = em.graph.node("InstanceNormalization", [grouped, ones, zeros], epsilon=float(a["eps"]))
    out = em.graph.node("Reshape", [normed, _shape(em, x.shape)])
    return _affine(em, out, a["weight"], a["bias"], (x.shape[1],) + (1,) * (x.dim() - 2))


# -- float linear algebra (layers kept in full precision) -----------------------------------

@_register(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(em, node, a):
    return em.graph.node("MatMul", [em.tensor(a["self"]), em.tensor(a["other"] if "other" in a else a["mat2"])])


@_register(aten.linear.default)
def _linear(em, node, a):
    weight = em.value(a["weight"])
    return layers.gemm(em, em.tensor(a["input"]), tuple(em.value(a["input"]).shape), em.tensor(a["weight"]),
                       weight.shape[0], em.value(a["bias"]), em.hint(a["weight"]))


@_register(aten.conv2d.default)
def _conv2d(em, node, a):
    pair = lambda v: list(v) if isinstance(v, (list, tuple)) else [v, v]  # noqa: E731
    weight = em.value(a["weight"])
    make = lambda shape: em.graph.constant(weight if shape is None else weight.reshape(shape), em.hint(a["weight"]))  # noqa: E731
    return layers.conv(em, em.tensor(a["input"]), tuple(em.value(a["input"]).shape), make, tuple(weight.shape),
                       em.value(a["bias"]), pair(a["stride"]), pair(a["padding"]), pair(a["dilation"]), a["groups"],
                       em.hint(a["weight"]))


@_register(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)
def _upsample_nearest(em, node, a):
    x, out = em.value(node.args[0]), em.out(node)
    scales = [1.0, 1.0] + [o / i for o, i in zip(out.shape[2:], x.shape[2:])]
    return em.graph.node("Resize", [em.tensor(node.args[0]), "", em.tensor(torch.tensor(scales))], mode="nearest",
                         nearest_mode="floor", coordinate_transformation_mode="asymmetric")

