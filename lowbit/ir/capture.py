"""Capture an ``nn.Module`` as an aten-level ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` fails on every diffusers family (data-dependent control flow);
``torch.export.export(strict=False)`` captures all of them (DESIGN.md). The batch dimension is
exported as dynamic (at a batch of at least 2, since export specialises a size of 1), so a module
calibrated at any batch size also runs any other, classifier-free guidance's doubled batch included. Parameters keep their module paths (``transformer_blocks.3.attn2.to_q``)
and each weighted node gets a :class:`LayerInfo`, so reports and recipes name layers as users do.
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

__all__ = ["CaptureError", "InputSignature", "SIGNATURE_KEY", "TensorSpec", "capture", "module_path", "normalize_inputs", "unique_path"]

SIGNATURE_KEY = "lowbit.signature"
_WEIGHTED = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv2d.default: "conv2d",
}


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the module and what to try."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor input; ``None`` marks the (dynamic) batch dimension."""

    shape: tuple[int | None, ...]
    dtype: str

    def example(self, batch: int = 1) -> torch.Tensor:
        shape = tuple(batch if d is None else d for d in self.shape)
        dtype = getattr(torch, self.dtype)
        return torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)

    def accepts(self, t: torch.Tensor) -> bool:
        return t.dim() == len(self.shape) and all(d is None or d == s for d, s in zip(self.shape, t.shape))

    def describe(self) -> str:
        return "(" + ", ".join("B" if d is None else str(d) for d in self.shape) + f") {self.dtype}"


@dataclass(frozen=True)
class InputSignature:
    """The inputs a graph was captured with: a pytree of TensorSpecs and plain constants."""

    inputs: dict[str, Any]
    timestep_arg: str | None

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
                        f"{want.describe()}; only the batch dimension (B) may change. Calibrate with "
                        f"inputs of the shape you will run."
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


def normalize_inputs(model: torch.nn.Module, args: tuple, kwargs: dict | None, timestep_arg: str | None) -> dict[str, Any]:
    """All inputs as keyword arguments in one canonical form.

    ``None`` arguments and ``return_dict`` are dropped (the graph always returns a tuple), and the
    timestep becomes a float tensor of shape (batch,), so a diffusers pipeline that passes a
    Python int, a 0-d tensor or a (batch,) tensor reaches the same graph.
    """
    out = {k: v for k, v in _bound_arguments(model, tuple(args), dict(kwargs or {})).items() if v is not None and k != "return_dict"}
    if timestep_arg is not None and timestep_arg in out:
        first = next((v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        batch = first.shape[0] if first is not None else 1
        t = torch.as_tensor(out[timestep_arg]).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch).clone()
        out[timestep_arg] = t
    return out


def _signature_of(kwargs: dict[str, Any], batch: int, timestep_arg: str | None) -> InputSignature:
    def spec(v):
        if not isinstance(v, torch.Tensor):
            return v
        shape = tuple(None if (i == 0 and v.dim() > 0 and s == batch) else s for i, s in enumerate(v.shape))
        return TensorSpec(shape, str(v.dtype).removeprefix("torch."))

    return InputSignature(pytree.tree_map(spec, kwargs), timestep_arg)


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


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, timestep_arg: str | None = "timestep") -> torch.fx.GraphModule:
    """Export ``model`` on example inputs and return its aten-level GraphModule.

    The GraphModule shares parameter storage with ``model``; passes never modify parameters in
    place, so the original model stays untouched. Its ``meta[SIGNATURE_KEY]`` holds the
    :class:`InputSignature` that calls must match.
    """
    kw = normalize_inputs(model, args, kwargs, timestep_arg)
    first = next((v for v in pytree.tree_leaves(kw) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        raise CaptureError(f"{type(model).__name__}: no tensor input with a batch dimension among {sorted(kw)}")
    batch = first.shape[0]
    dynamic = pytree.tree_map(lambda v: {0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() > 0 else None, kw)
    example = kw
    if batch == 1:  # torch.export specialises sizes 0 and 1: capture at batch 2 so that the batch stays dynamic
        example = pytree.tree_map(lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1
                                  else v, kw)
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
    gm.meta[SIGNATURE_KEY] = _signature_of(kw, batch, timestep_arg)
    return gm
