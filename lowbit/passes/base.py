"""What every pass is: a named, registered, configured callable from (graph, context) to a PassResult.

Passes are target-agnostic: they import ``lowbit.ir`` only, never another pass. Their settings
are constructor arguments with type annotations, so a recipe can create a pass from its name and
a table of settings (``lowbit.passes.registry``). Every subclass that sets ``name`` registers
itself. The state shared across a pipeline — the recipe's precision, calibration statistics,
quantization parameters, artifacts — lives in the :class:`PassContext`, never in a pass or a graph.

Ordering is declared both ways: ``requires`` (passes that must have run before this one) and
``before`` (passes that must not have run yet when this one runs). ``phase`` orders the big
steps: "rewrite" passes depend only on the model and the recipe (``lowbit.load`` replays them),
"observe" passes prepare calibration, "decide" passes turn statistics into parameters and
artifacts (saved, never replayed), and "convert" emits the quantized ops (replayed on load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch.fx

from lowbit.ir.artifacts import Artifact
from lowbit.ir.params import OperandParams
from lowbit.ir.precision import Precision
from lowbit.ir.statistics import ObservationStore

__all__ = ["PASSES", "PHASES", "Pass", "PassContext", "PassError", "PassResult", "measured"]

Phase = Literal["rewrite", "observe", "decide", "convert"]
PHASES: tuple[Phase, ...] = ("rewrite", "observe", "decide", "convert")
PASSES: dict[str, type["Pass"]] = {}  # name -> class, filled as pass modules are imported


@dataclass(frozen=True)
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """State shared by the passes of one quantization run.

    ``params`` maps a quantization target ("<layer path>:<operand>") to its parameters and
    ``artifacts`` maps a name to any other decision a pass made (``lowbit.ir.artifacts``); both are
    what ``lowbit.save`` writes and ``lowbit.load`` restores. ``samples`` holds graph inputs kept
    from calibration for passes that run the model again (weight reconstruction).
    """

    precision: Precision | None = None
    step_arg: str | None = "timestep"
    observations: ObservationStore = field(default_factory=ObservationStore)
    params: dict[str, OperandParams] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


class PassError(RuntimeError):
    """A pass could not do its work; the message names the pass and the node or layer."""


class Pass:
    """Base class: subclasses set ``name`` (verb first), ``phase``, ordering, and implement ``run``."""

    name: ClassVar[str]
    phase: ClassVar[Phase] = "rewrite"
    requires: ClassVar[tuple[str, ...]] = ()  # passes that must have run earlier
    before: ClassVar[tuple[str, ...]] = ()  # passes that must run later, if at all
    kept_samples: int = 0  # calibration samples the pass needs kept in ctx.samples

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in PASSES and PASSES[cls.name].__qualname__ != cls.__qualname__:
                raise TypeError(f"two passes are named {cls.name!r}: {PASSES[cls.name].__qualname__} and {cls.__qualname__}")
            if cls.phase not in PHASES:
                raise TypeError(f"pass {cls.name!r}: phase must be one of {PHASES}, not {cls.phase!r}")
            PASSES[cls.name] = cls

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.run(gm, ctx)

    def __repr__(self) -> str:
        return self.name


def measured(ctx: PassContext, pass_name: str, layers: list[str], target) -> dict[str, dict]:
    """Each layer's per-step statistics filed under ``target(layer)`` at calibration; a PassError names
    the first layer with none."""
    missing = [layer for layer in layers if target(layer) not in ctx.observations.stats]
    if missing:
        raise PassError(f"{pass_name}: nothing was measured for {missing[0]}: was it executed by the calibration "
                        f"inputs, and did its observer pass run before calibration?")
    return {layer: ctx.observations.stats[target(layer)] for layer in layers}
