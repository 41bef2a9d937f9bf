"""Observers: graph modules that file streaming statistics of the tensor they see.

An observer holds no reference to any store between calibration runs: ``observing(gm, store)``
hands every observer of a graph the store to fill for the duration of a block, so the state of a
calibration lives in the pass context, and a graph run outside calibration cannot write anywhere.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx

from lowbit.ir.attention_statistics import CandidateErrors
from lowbit.ir.attention_window_statistics import WindowMass
from lowbit.ir.cfg_statistics import HalfDifference
from lowbit.ir.statistics import CalibrationError, Layout, ObservationStore, RangeStatistics

__all__ = ["OBSERVERS", "AttentionErrorObserver", "AttentionMassObserver", "CFGDifferenceObserver", "Observer", "attach_observer",
           "step_input", "is_observer", "observing", "remove_observers"]

OBSERVERS = "lowbit_observers"


class Observer(torch.nn.Module):
    """Records RangeStatistics of its input, split by the timestep of each batch element."""

    def __init__(self, target: str, node: str, layout: Layout):
        super().__init__()
        self.target, self.node, self.layout = target, node, layout
        self.store: ObservationStore | None = None

    def measure(self, x: torch.Tensor, *companions: torch.Tensor):
        return RangeStatistics.of(x, self.layout)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None, *companions: torch.Tensor) -> None:
        """``companions``: other tensors the statistic needs, split by timestep along with ``x``."""
        if self.store is None:
            raise CalibrationError(f"observer of {self.target} ran outside calibration: run the graph inside "
                                   f"lowbit.ir.observers.observing(graph_module, ctx.observations)")
        steps = [0.0] if timestep is None else torch.as_tensor(timestep).reshape(-1).tolist()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"non-finite values (NaN or Inf) reached {self.target} (node '{self.node}') at timestep "
                f"{steps[0]:g}: check the calibration inputs, or the layers before this one, for overflow"
            )
        unique = sorted(set(steps))
        if len(unique) == 1:
            self.store.add(self.target, unique[0], self.measure(x, *companions))
            return
        if x.shape[0] != len(steps):
            raise CalibrationError(
                f"{self.target} (node '{self.node}'): the batch mixes timesteps {unique} but this tensor's "
                f"leading dimension ({x.shape[0]}) is not the batch ({len(steps)}); calibrate one timestep per call"
            )
        t = torch.tensor(steps)
        for value in unique:
            self.store.add(self.target, value, self.measure(x[t == value], *(c[t == value] for c in companions)))


class AttentionErrorObserver(Observer):
    """Records, from an attention's probabilities and its V, the output error of each candidate
    probability quantizer (CandidateErrors, for choose_attention_scheme)."""

    def __init__(self, target: str, node: str, start_column: int | None, levels: int):
        super().__init__(target, node, "channels_last")
        self.start_column, self.levels = start_column, levels

    def measure(self, x: torch.Tensor, *companions: torch.Tensor) -> CandidateErrors:
        (v,) = companions
        return CandidateErrors.of(x, v, self.start_column, self.levels)


class AttentionMassObserver(Observer):
    """Records where an attention's probability mass lies along its key parts' diagonals
    (WindowMass, for choose_attention_windows); ``step_tokens`` is the model's cached-key layout,
    ``geometry`` how distance is measured ("band" or "grid")."""

    def __init__(self, target: str, node: str, step_tokens: tuple[int, ...] | None, geometry: str = "band"):
        super().__init__(target, node, "channels_last")
        self.step_tokens, self.geometry = step_tokens, geometry

    def measure(self, x: torch.Tensor, *companions: torch.Tensor) -> WindowMass:
        return WindowMass.of(x, self.step_tokens, self.geometry)


class CFGDifferenceObserver(Observer):
    """Records how far apart the two halves of a CFG batch are at an attention's output (HalfDifference,
    for choose_cfg_sharing); its companion is the probabilities, whose shape counts the work."""

    def __init__(self, target: str, node: str):
        super().__init__(target, node, "channels_last")

    def measure(self, x: torch.Tensor, *companions: torch.Tensor) -> HalfDifference:
        (probs,) = companions
        return HalfDifference.of(x, probs)


@contextmanager
def observing(gm: torch.nn.Module, store: ObservationStore) -> Iterator[None]:
    """Let the observers of ``gm`` file their statistics into ``store`` within the block."""
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    for m in observers:
        m.store = store
    try:
        yield
    finally:
        for m in observers:
            m.store = None


def step_input(gm: torch.fx.GraphModule, step_arg: str | None) -> torch.fx.Node | None:
    """The graph's step input (a diffusion timestep, a VAR scale), which every observer reads."""
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == step_arg), None)


def attach_observer(gm: torch.fx.GraphModule, name: str, observer: Observer, args: tuple, *,
                    before: torch.fx.Node | None = None, after: torch.fx.Node | None = None) -> torch.fx.Node:
    """Register ``observer`` as ``lowbit_observers.<name>`` and call it on ``args`` (value, step,
    companions) right before or after a node; the caller recompiles once it has attached them all."""
    if not hasattr(gm, OBSERVERS):
        gm.add_submodule(OBSERVERS, torch.nn.Module())
    getattr(gm, OBSERVERS).add_module(name, observer)
    with gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after):
        return gm.graph.call_module(f"{OBSERVERS}.{name}", args)


def is_observer(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(OBSERVERS + ".")


def remove_observers(gm: torch.fx.GraphModule) -> int:
    """Erase ``gm``'s observer nodes and modules once their statistics are taken; how many nodes went."""
    observers = [n for n in gm.graph.nodes if is_observer(n)]
    for node in observers:
        gm.graph.erase_node(node)
    if hasattr(gm, OBSERVERS):
        delattr(gm, OBSERVERS)
    return len(observers)
