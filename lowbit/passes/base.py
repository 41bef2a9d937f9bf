"""What every pass is: a named, configured callable from (graph, context) to a PassResult.

Passes are target-agnostic: they import ``lowbit.ir`` only. Their settings are constructor
arguments (a recipe builds configured passes), and the state they share across a pipeline —
calibration statistics, chosen quantization parameters — lives in the :class:`PassContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.fx

from lowbit.ir.params import OperandParams
from lowbit.ir.statistics import ObservationStore

__all__ = ["Pass", "PassContext", "PassError", "PassResult"]


@dataclass(frozen=True)
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """State shared by the passes of one quantization run.

    ``params`` maps a quantization target ("<layer path>:<operand>") to its parameters; it is
    what ``lowbit.save`` writes and what ``lowbit.load`` replays into a freshly captured graph.
    ``samples`` holds graph inputs (keyword arguments) kept from calibration for passes that run
    the model again (weight reconstruction); it stays empty unless a recipe asks for them.
    """

    timestep_arg: str | None = "timestep"
    observations: ObservationStore = field(default_factory=ObservationStore)
    params: dict[str, OperandParams] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


class PassError(RuntimeError):
    """A pass could not do its work; the message names the pass and the node or layer."""


class Pass:
    """Base class: subclasses set ``name`` (verb first) and ``requires`` and implement ``run``."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # passes that must have run earlier in the pipeline

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.run(gm, ctx)

    def __repr__(self) -> str:
        return self.name
