"""The ``torch.compile`` backend "lowbit": lowbit ops become kernels, the rest goes to inductor.

Two ways in:

- ``torch.compile(qmodel, backend="lowbit")`` with a module made by ``lowbit.quantize``: dynamo
  traces its quantized graph, whose lowbit ops are retargeted here;
- ``torch.compile(model, backend="lowbit", options={"recipe": ..., "calibration": [...]})`` with a
  full-precision model: each graph dynamo hands over is quantized with lowbit's passes first
  (see :mod:`lowbit.lowering.quantize_graph`), then retargeted the same way.

Each compiled graph's :class:`~lowbit.lowering.translate.TranslationReport` is logged and kept
(:func:`compile_reports`); fallbacks to reference arithmetic, graph breaks and recompilations
are warned about, never silent.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch._dynamo.utils import counters

from lowbit.lowering.cpu import CPU_TRANSLATIONS
from lowbit.lowering.translate import TranslationReport, translate

__all__ = ["BackendOptions", "CompileReport", "compile_reports", "lowbit_backend"]

log = logging.getLogger("lowbit")
_TARGETS = ("cpu", "triton")


@dataclass(frozen=True)
class BackendOptions:
    """What ``torch.compile(..., options=...)`` may pass: a recipe with calibration samples
    (``(args, kwargs)`` pairs for the model's forward) to quantize a full-precision model, the
    target ("cpu" or "triton"; default: "triton" for CUDA inputs, else "cpu"), and the name of
    the timestep argument."""

    recipe: Any = None
    calibration: Any = None
    target: str | None = None
    step_arg: str | None = "timestep"

    @classmethod
    def parse(cls, options: dict | None) -> BackendOptions:
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"lowbit backend: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        parsed = cls(**options)
        if parsed.target is not None and parsed.target not in _TARGETS:
            raise ValueError(f"lowbit backend: target must be one of {_TARGETS}, not {parsed.target!r}")
        if (parsed.recipe is None) != (parsed.calibration is None):
            raise ValueError("lowbit backend: 'recipe' and 'calibration' go together (quantize a full-precision "
                             "model); leave both out to compile a module made by lowbit.quantize")
        return parsed


@dataclass
class CompileReport:
    """One call of the backend: which graph, what it became, and what dynamo did around it."""

    compile_id: str
    translation: TranslationReport
    recompilation: bool = False
    new_graph_breaks: dict[str, int] = field(default_factory=dict)
    quantized_here: bool = False

    def summary(self) -> str:
        text = f"graph {self.compile_id}: {self.translation.summary()}"
        if self.recompilation:
            text += "; this is a recompilation (a guard failed: new shapes, dtypes or Python constants)"
        if self.new_graph_breaks:
            text += "; graph breaks: " + "; ".join(f"{r} x{n}" for r, n in self.new_graph_breaks.items())
        return text


MAX_REPORTS = 256
_REPORTS: deque[CompileReport] = deque(maxlen=MAX_REPORTS)  # bounded: a long-running server compiles forever


def compile_reports() -> list[CompileReport]:
    """Reports of the last ``MAX_REPORTS`` graphs the backend compiled in this process, oldest first."""
    return list(_REPORTS)


def _target(options: BackendOptions, example_inputs: list) -> str:
    if options.target is not None:
        return options.target
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "triton" if on_cuda else "cpu"


def _translations(target: str) -> dict:
    if target == "cpu":
        return CPU_TRANSLATIONS
    from lowbit.lowering.triton import TRITON_TRANSLATIONS  # imports triton only when asked for

    return TRITON_TRANSLATIONS


_SEEN_BREAKS: dict[str, int] = {}


def _new_graph_breaks() -> dict[str, int]:
    """Graph breaks dynamo counted since the backend last looked. Its counters are process-wide; the
    copy kept here mirrors them (reasons dynamo has since forgotten are dropped), so it stays as small."""
    now = dict(counters["graph_break"])
    new = {reason: n - _SEEN_BREAKS.get(reason, 0) for reason, n in now.items() if n > _SEEN_BREAKS.get(reason, 0)}
    _SEEN_BREAKS.clear()
    _SEEN_BREAKS.update(now)
    return new


def _record(report: CompileReport) -> None:
    _REPORTS.append(report)
    log.info(report.summary())
    if report.recompilation or report.new_graph_breaks:
        warnings.warn(report.summary() + "; torch._dynamo.explain(model)(*inputs) shows where and why", stacklevel=3)
    elif report.translation.fallbacks:
        warnings.warn(report.summary(), stacklevel=3)
    elif not report.translation.found and not report.quantized_here:
        warnings.warn(f"lowbit backend: graph {report.compile_id} holds no quantized op, so it runs in full precision: "
                      f"compile a module made by lowbit.quantize, or pass options={{'recipe': ..., 'calibration': ...}}",
                      stacklevel=3)


def lowbit_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """The dynamo backend registered as "lowbit" (entry point ``torch_dynamo_backends``)."""
    from torch._inductor.compile_fx import compile_fx

    opts = BackendOptions.parse(options)
    target = _target(opts, example_inputs)
    compile_id = gm.meta.get("dynamo_compile_id")
    recompilation = getattr(compile_id, "frame_compile_id", 0) not in (0, None)
    if opts.recipe is not None:
        from lowbit.lowering.quantize_graph import quantize_dynamo_graph

        graph = quantize_dynamo_graph(gm, example_inputs, opts.recipe, opts.calibration, opts.step_arg)
        report = CompileReport(str(compile_id), translate(graph.graph_module, target, _translations(target)),
                               recompilation, quantized_here=True)
        compiled = compile_fx(graph.graph_module, graph.flat_inputs(example_inputs))
        run: Callable = graph.wrap(compiled)
    else:
        report = CompileReport(str(compile_id), translate(gm, target, _translations(target)), recompilation)
        run = compile_fx(gm, example_inputs)
    report.new_graph_breaks = _new_graph_breaks()
    _record(report)
    return run
