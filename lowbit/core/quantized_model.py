"""The module that ``lowbit.quantize`` returns: a drop-in replacement for a diffusers denoiser.

It runs the quantized graph, accepts the calls a diffusers pipeline makes (positional or keyword
arguments, an int or tensor timestep, ``return_dict``), checks the inputs against the captured
signature with a message that names the argument, and answers attribute look-ups the pipeline
makes on its denoiser (``config``, ``dtype``, ``in_channels``...) from the original model.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.fx

from lowbit.ir.capture import SIGNATURE_KEY, InputSignature, normalize_inputs
from lowbit.ir.artifacts import Artifact
from lowbit.ir.params import OperandParams
from lowbit.recipes import Recipe

__all__ = ["QuantizedModel"]


class QuantizedModel(torch.nn.Module):
    def __init__(self, graph_module: torch.fx.GraphModule, original: torch.nn.Module, recipe: Recipe,
                 params: dict[str, OperandParams], artifacts: dict[str, Artifact], step_arg: str | None, records=()):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self.params = params
        self.artifacts = artifacts
        self.step_arg = step_arg
        self.records = list(records)
        object.__setattr__(self, "_original", original)  # not a submodule: no duplicate weights in state_dict
        # dynamo keeps compiled graphs, and counts recompiles against its limit (8), per code object: with
        # one shared forward, every QuantizedModel in a process would spend the same budget (a VAR step
        # compiles three times), and past it dynamo silently runs the rest eagerly
        self.forward = types.MethodType(_own_copy(type(self).forward), self)

    @property
    def signature(self) -> InputSignature:
        return self.graph_module.meta[SIGNATURE_KEY]

    @property
    def original(self) -> torch.nn.Module:
        return self._original

    def forward(self, *args, **kwargs) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        inputs = normalize_inputs(self._original, args, kwargs, self.step_arg)
        self.signature.check(inputs, type(self._original).__name__)
        out = self.graph_module(**inputs)
        if return_dict or isinstance(out, tuple):
            return out
        return out.to_tuple()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._original, name)


def _own_copy(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a code object of its own (same bytecode), so caches keyed by code are too."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
