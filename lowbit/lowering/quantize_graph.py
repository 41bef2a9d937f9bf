"""Quantize a graph that dynamo hands to the backend, with lowbit's usual passes.

Dynamo lifts every parameter and buffer to a graph input and names the origin of each input
(``L['self'].__dict__['_modules']['pos_embed']._modules['proj']._parameters['weight']``,
``L['timestep']``). From those names the graph is rebuilt as a module — parameters back at their
module paths, so layers keep the names users know, and the model's inputs as keyword
arguments — which ``lowbit.quantize`` captures, calibrates and converts as it would the original
model. The result runs with the flat inputs dynamo passes at run time.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.utils import _pytree as pytree

__all__ = ["QuantizedDynamoGraph", "quantize_dynamo_graph"]

_ROOT = "L['self']"
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}
_SEGMENT = re.compile(r"\['([^']*)'\]|\.(\w+)")


def _segments(source: str) -> list[str]:
    return [a or b for a, b in _SEGMENT.findall(source)]


def _attribute_path(source: str) -> str:
    """``pos_embed.proj.weight`` for the source of a lifted parameter."""
    return ".".join(s for s in _segments(source[len(_ROOT):]) if s not in _CONTAINERS)


def _source(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        raise ValueError(f"lowbit backend: graph input {node.name} has no dynamo source; cannot tell a weight from an input")
    return grapharg.source.name


@dataclass(frozen=True)
class _Frame:
    """The parameters of the function dynamo compiled (a model's forward, or a decorator's
    ``wrapper(self, *args, **kwargs)`` around it), to route inputs the way dynamo names them."""

    positional: tuple[str, ...]
    var_keyword: str | None

    @classmethod
    def current(cls) -> _Frame:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code = InstructionTranslator.current_tx().f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount + 2]
        n = code.co_argcount + code.co_kwonlyargcount
        has_varargs, has_varkw = bool(code.co_flags & inspect.CO_VARARGS), bool(code.co_flags & inspect.CO_VARKEYWORDS)
        var_keyword = names[n + has_varargs] if has_varkw else None
        return cls(tuple(a for a in code.co_varnames[: code.co_argcount] if a != "self"), var_keyword)

    def route(self, source: str) -> list[str]:
        """Keys from the call's keyword inputs to one input: L['kwargs']['sample'] -> ['sample']."""
        keys = _segments(source[1:])
        return keys[1:] if keys and keys[0] == self.var_keyword else keys

    def keywords(self, i: int, args: tuple, kwargs: dict, used: set[str]) -> dict:
        """Calibration sample ``i`` as the keyword inputs the graph uses."""
        if len(args) > len(self.positional):
            raise ValueError(f"lowbit backend: calibration sample {i} has {len(args)} positional arguments but the "
                             f"compiled function names only {list(self.positional)}; pass the inputs by keyword")
        merged = {**dict(zip(self.positional, args)), **kwargs}
        return {k: v for k, v in merged.items() if k in used}


class _GraphAsModule(torch.nn.Module):
    """The dynamo graph with its lifted weights put back at their module paths."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, frame: _Frame):
        super().__init__()
        self.gm = gm
        self.frame = frame
        self.sources: list[str] = []
        self.examples: dict[int, torch.Tensor] = {}
        names: dict[str, None] = {}
        for i, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
            source = _source(node)
            self.sources.append(source)
            if source.startswith(_ROOT):
                self._register(_attribute_path(source), value)
                continue
            names[frame.route(source)[0]] = None
            if isinstance(value, torch.Tensor):
                self.examples[i] = value
        # torch.export binds inputs by the forward's signature: this instance's names the model's inputs
        def forward(**inputs):
            return self.gm(*(self._input(i, s, inputs) for i, s in enumerate(self.sources)))

        forward.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
        self.forward = forward
        self.input_names = set(names)

    def _register(self, path: str, value: Any) -> None:
        owner = self
        *parents, name = path.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, torch.nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)

    def _input(self, i: int, source: str, inputs: dict) -> Any:
        if source.startswith(_ROOT):
            owner, _, name = _attribute_path(source).rpartition(".")
            return getattr(self.get_submodule(owner), name)
        value: Any = inputs
        for key in self.frame.route(source):
            value = value[int(key)] if isinstance(value, (list, tuple)) else value[key]
        example = self.examples.get(i)
        if isinstance(example, torch.Tensor) and isinstance(value, torch.Tensor):
            if example.dim() == 0 and value.dim() == 1:  # lowbit passes the timestep as (B,); the graph took a scalar
                value = value[0]
            value = value.to(example.dtype)
        return value


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


@dataclass
class QuantizedDynamoGraph:
    """The quantized graph (flat inputs: the model's own inputs only) and how to feed it."""

    graph_module: torch.fx.GraphModule
    module: _GraphAsModule
    qmodel: Any

    def _inputs(self, flat: list) -> dict[str, Any]:
        """The model's keyword inputs, rebuilt from dynamo's flat inputs (weights left out)."""
        from lowbit.ir.capture import normalize_inputs

        inputs: dict[str, Any] = {}
        for source, value in zip(self.module.sources, flat):
            if source.startswith(_ROOT):
                continue
            keys = self.module.frame.route(source)
            slot = inputs
            for key in keys[:-1]:
                slot = slot.setdefault(key, {})
            slot[keys[-1]] = value
        return normalize_inputs(self.module, (), inputs, self.qmodel.step_arg)

    def flat_inputs(self, flat: list) -> list:
        return pytree.tree_leaves(((), self._inputs(flat)))

    def wrap(self, compiled: Callable) -> Callable:
        def run(*flat):
            return compiled(*self.flat_inputs(list(flat)))

        return run


def quantize_dynamo_graph(gm: torch.fx.GraphModule, example_inputs: list, recipe: Any, calibration: Iterable,
                          step_arg: str | None) -> QuantizedDynamoGraph:
    """Quantize ``gm`` with ``recipe``, calibrated on ``(args, kwargs)`` samples of the model's forward."""
    from lowbit.core.quantize import quantize

    module = _GraphAsModule(gm, example_inputs, _Frame.current())
    samples = [((), module.frame.keywords(i, tuple(a), dict(k), module.input_names)) for i, (a, k) in enumerate(calibration)]
    with torch._guards.tracing(None):  # capture with its own fake mode: nothing may leak into dynamo's guards
        qmodel = quantize(module, recipe, samples, step_arg=step_arg, progress=False)
    qgm = qmodel.graph_module
    qgm.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs, as inductor takes them
    qgm.recompile()
    return QuantizedDynamoGraph(qgm, module, qmodel)
