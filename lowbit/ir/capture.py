"""Capture an ``nn.Module`` as an aten-level ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` fails on every diffusers family (data-dependent control flow);
``torch.export.export(strict=False)`` captures all of them (DESIGN.md). The batch dimension is
exported as dynamic (at a batch of at least 2, since export specialises a size of 1), so a module
calibrated at any batch size also runs any other, classifier-free guidance's doubled batch included.
A model may name further dynamic dimensions in a ``dynamic_dims`` attribute: VAR's step takes
each scale's tokens and a KV cache that grows by scale, and one graph with symbolic token and
cache lengths serves every scale (DESIGN: one graph, keyed by step, rather than a graph per scale:
the parameters, passes and saved model stay one; the phone export specialises it per scale).
Parameters keep their module paths (``transformer_blocks.3.attn2.to_q``) and each weighted node
gets a :class:`LayerInfo`, so reports and recipes name layers as users do.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from lowbit.ir.annotations import LAYER_KEY, LayerInfo

__all__ = ["CFG_LAYOUTS", "CFG_LAYOUT_KEY", "CaptureError", "InputSignature", "SIGNATURE_KEY", "STEP_TOKENS_KEY", "TensorSpec",
           "batch_size", "capture", "module_path", "normalize_inputs", "unique_path"]

SIGNATURE_KEY = "lowbit.signature"
STEP_TOKENS_KEY = "lowbit.step_tokens"  # the model's step_tokens: how many keys each step adds to a cache
CFG_LAYOUT_KEY = "lowbit.cfg_layout"  # the model's cfg_layout: which half of a CFG batch is conditional
CFG_LAYOUTS = ("conditional_first", "unconditional_first")  # which half of a CFG batch is conditional
_WEIGHTED = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv2d.default: "conv2d",
}


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the module and what to try."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor input; ``None`` marks the (dynamic) batch dimension, and
    ``dynamic`` lists the other dimensions that may change between calls (a VAR scale's token
    count), whose entry in ``shape`` is the size captured."""

    shape: tuple[int | None, ...]
    dtype: str
    dynamic: tuple[int, ...] = ()

    def example(self, batch: int = 1) -> torch.Tensor:
        shape = tuple(batch if d is None else d for d in self.shape)
        dtype = getattr(torch, self.dtype)
        return torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)

    def accepts(self, t: torch.Tensor) -> bool:
        return t.dim() == len(self.shape) and all(d is None or i in self.dynamic or d == s
                                                  for i, (d, s) in enumerate(zip(self.shape, t.shape)))

    def describe(self) -> str:
        dims = ("B" if d is None else "*" if i in self.dynamic else str(d) for i, d in enumerate(self.shape))
        return "(" + ", ".join(dims) + f") {self.dtype}"


@dataclass(frozen=True)
class InputSignature:
    """The inputs a graph was captured with: a pytree of TensorSpecs and plain constants."""

    inputs: dict[str, Any]
    step_arg: str | None

    def examples(self, batch: int = 1) -> dict[str, Any]:
        return pytree.tree_map(lambda s: s.example(batch) if isinstance(s, TensorSpec) else s, self.inputs)

    def check(self, kwargs: dict[str, Any], where: str) -> None:
        """Raise a ValueError naming the argument whose shape or structure differs."""
        missing, extra = set(self.inputs) - set(kwargs), set(kwargs) - set(self.inputs)
        if missing or extra:
            raise ValueError(
                f"{where}: the model was captured with arguments {sorted(self.inputs)}, but got "
                f"{sorted(kwargs)} (missing {sorted(missing)}, unexpected {sorted(extra)})"
            )
        for name, expected in self.inputs.items():
            got_leaves, got_spec = pytree.tree_flatten(kwargs[name])
            want_leaves, want_spec = pytree.tree_flatten(expected)
            if got_spec != want_spec:
                raise ValueError(f"{where}: argument {name!r} has structure {got_spec}, captured as {want_spec}")
            for got, want in zip(got_leaves, want_leaves):
                if isinstance(want, TensorSpec) and not (isinstance(got, torch.Tensor) and want.accepts(got)):
                    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    raise ValueError(
                        f"{where}: argument {name!r} has shape {shape}, but the model was captured with "
                        f"{want.describe()}; only the batch dimension (B) and those marked * may change. "
                        f"Calibrate with inputs of the shape you will run."
                    )


def _bound_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def batch_size(inputs: Any) -> int | None:
    """The leading size of the first tensor with a dimension among ``inputs`` (None if there is none)."""
    first = next((v for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return None if first is None else first.shape[0]


def normalize_inputs(model: torch.nn.Module, args: tuple, kwargs: dict | None, step_arg: str | None) -> dict[str, Any]:
    """All inputs as keyword arguments in one canonical form.

    ``None`` arguments and ``return_dict`` are dropped (the graph always returns a tuple), and the
    timestep becomes a float tensor of shape (batch,), so a diffusers pipeline that passes a
    Python int, a 0-d tensor or a (batch,) tensor reaches the same graph.
    """
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "return_dict"}  # also for models that take none
    out = {k: v for k, v in _bound_arguments(model, tuple(args), kwargs).items() if v is not None}
    if step_arg is not None and step_arg in out:
        t = torch.as_tensor(out[step_arg]).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch_size(out) or 1).clone()
        out[step_arg] = t
    return out


def _dynamic_dims(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """A model's ``dynamic_dims``: argument name -> the dimensions (besides the batch) of every
    tensor in that argument that change between calls, e.g. a VAR step's token and cache lengths."""
    dims = getattr(model, "dynamic_dims", {})
    if not all(isinstance(v, tuple) and all(isinstance(d, int) and d > 0 for d in v) for v in dims.values()):
        raise CaptureError(f"{type(model).__name__}.dynamic_dims must map argument names to tuples of dimensions > 0; got {dims}")
    return dims


def _step_tokens(model: torch.nn.Module) -> tuple[int, ...]:
    """A model's ``step_tokens``: the tokens each step adds to its attention's key cache (VAR: s_k² per
    scale), which lays out the key axis of a cached attention in parts (LiteVAR's MDWA); () if none."""
    tokens = tuple(getattr(model, "step_tokens", ()))
    if not all(isinstance(t, int) and t > 0 for t in tokens):
        raise CaptureError(f"{type(model).__name__}.step_tokens must be positive ints; got {tokens}")
    return tokens


def _cfg_layout(model: torch.nn.Module) -> str | None:
    """A model's ``cfg_layout``: "conditional_first" (VAR's [class; null]) or "unconditional_first"
    (diffusers pipelines' [negative; prompt]) for the halves of its CFG batches; None if it says nothing."""
    layout = getattr(model, "cfg_layout", None)
    if layout is not None and layout not in CFG_LAYOUTS:
        raise CaptureError(f"{type(model).__name__}.cfg_layout must be one of {CFG_LAYOUTS}; got {layout!r}")
    return layout


def _per_argument(kwargs: dict[str, Any], fn) -> dict[str, Any]:
    """``fn(name, tensor)`` applied to every tensor leaf, by top-level argument name."""
    return {k: pytree.tree_map(lambda v, k=k: fn(k, v) if isinstance(v, torch.Tensor) else v, v) for k, v in kwargs.items()}


def _signature_of(kwargs: dict[str, Any], batch: int, step_arg: str | None, dynamic: dict[str, tuple[int, ...]]) -> InputSignature:
    def spec(name: str, v: torch.Tensor) -> TensorSpec:
        shape = tuple(None if (i == 0 and v.dim() > 0 and s == batch) else s for i, s in enumerate(v.shape))
        return TensorSpec(shape, str(v.dtype).removeprefix("torch."), dynamic.get(name, ()))

    return InputSignature(_per_argument(kwargs, spec), step_arg)


def _export_example(kwargs: dict[str, Any], batch: int, dynamic: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Inputs that torch.export traces with every dynamic size at 2 or more: it specialises sizes 0
    and 1 (a batch of one, a VAR's first scale of one token and an empty cache). Values do not
    matter to the trace, only shapes, so such a dimension is padded by repetition or with zeros."""
    def grow(name: str, v: torch.Tensor) -> torch.Tensor:
        if v.dim() and v.shape[0] == batch == 1:
            v = torch.cat([v, v])
        for d in dynamic.get(name, ()):
            if v.shape[d] < 2:
                pad = list(v.shape)
                pad[d] = 2 - v.shape[d]
                v = torch.cat([v, torch.ones(pad, dtype=v.dtype)], dim=d)
        return v

    return _per_argument(kwargs, grow)


@contextmanager
def _module_tracker(model: torch.nn.Module):
    """Record which submodules are being executed, to name the one where capture failed."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args) -> None:
        stack.append(names[module])

    def leave(module, args, output) -> None:  # returns None: a forward hook's value would replace the output
        if stack:
            stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _check_no_float64(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """float64 inputs to a float32 model (data from numpy) would fail deep inside the export."""
    if any(p.dtype == torch.float64 for p in model.parameters()):
        return
    for name, value in kwargs.items():
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in pytree.tree_leaves(value)):
            raise CaptureError(f"input {name!r} is float64 but {type(model).__name__}'s parameters are not: cast the "
                               f"calibration inputs to the model's dtype (e.g. x.float()) before quantizing")


def unique_path(path: str, seen: set[str]) -> str:
    """``path`` for a module's first call, ``path@1``, ``path@2``... for later calls (shared weights)."""
    unique, k = path, 0
    while unique in seen:
        k += 1
        unique = f"{path}@{k}"
    seen.add(unique)
    return unique


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path of a node, from the ``nn_module_stack`` that torch.export records."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, step_arg: str | None = "timestep") -> torch.fx.GraphModule:
    """Export ``model`` on example inputs and return its aten-level GraphModule.

    The GraphModule shares parameter storage with ``model``; passes never modify parameters in
    place, so the original model stays untouched. Its ``meta[SIGNATURE_KEY]`` holds the
    :class:`InputSignature` that calls must match.
    """
    kw = normalize_inputs(model, args, kwargs, step_arg)
    batch = batch_size(kw)
    if batch is None:
        raise CaptureError(f"{type(model).__name__}: no tensor input with a batch dimension among {sorted(kw)}")
    _check_no_float64(model, kw)
    dims = _dynamic_dims(model)
    unknown = set(dims) - set(kw)
    if unknown:
        raise CaptureError(f"{type(model).__name__}.dynamic_dims names {sorted(unknown)}, which are not among its inputs {sorted(kw)}")
    dynamic = _per_argument(kw, lambda name, v: {d: Dim.AUTO for d in ((0,) if v.dim() else ()) + dims.get(name, ())} or None)
    example = _export_example(kw, batch, dims)
    was_training = model.training
    model.eval()
    try:
        with _module_tracker(model) as stack, torch.no_grad():
            try:
                exported = torch.export.export(model, (), example, dynamic_shapes=dynamic, strict=False)
            except Exception as err:  # torch.export raises many types; all mean "cannot capture"
                where = stack[-1] if stack and stack[-1] else "the model's own forward"
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: torch.export failed inside module "
                    f"'{where}' ({type(err).__name__}: {first_line}). Try: make that module's forward "
                    f"free of data-dependent Python control flow, pass shapes as Python ints, or "
                    f"exclude it from capture by quantizing a submodule instead."
                ) from err
    finally:
        model.train(was_training)
    gm = exported.module()
    seen: set[str] = set()
    for node in gm.graph.nodes:
        kind = _WEIGHTED.get(node.target)
        if kind and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr":
            node.meta[LAYER_KEY] = LayerInfo(path=unique_path(node.args[1].target.rsplit(".", 1)[0], seen), kind=kind)
    gm.meta[SIGNATURE_KEY] = _signature_of(kw, batch, step_arg, dims)
    gm.meta[STEP_TOKENS_KEY] = _step_tokens(model)
    gm.meta[CFG_LAYOUT_KEY] = _cfg_layout(model)
    return gm
