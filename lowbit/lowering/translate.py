"""Swap each lowbit domain op in a graph for a target's implementation, and say what happened.

A target is a table from op to a *chooser*: given the node, it returns the Python function that
computes the op on that target (traced by inductor afterwards) and, when that function is only
the reference arithmetic because the target has no faster kernel for this case, the reason.
Ops a table does not name run their reference arithmetic (inlined, so inductor fuses it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.ops import REFERENCES
from lowbit.ir.params import PARAMS

__all__ = ["Chooser", "Fallback", "TranslationReport", "node_dtype", "node_shape", "translate"]

Chooser = Callable[[torch.fx.Node], tuple[Callable, str | None]]


@dataclass(frozen=True)
class Fallback:
    """A quantized op that runs the reference arithmetic on this target, and why."""

    node: str
    op: str
    layer: str
    reason: str

    def describe(self) -> str:
        return f"{self.op} at {self.layer or self.node}: {self.reason}"


@dataclass
class TranslationReport:
    """What one graph became: lowbit ops found, kernels used per op, and the fallbacks with their reasons."""

    target: str
    found: Counter = field(default_factory=Counter)
    lowered: Counter = field(default_factory=Counter)
    fallbacks: list[Fallback] = field(default_factory=list)

    def summary(self) -> str:
        done = ", ".join(f"{op} x{n}" for op, n in sorted(self.lowered.items())) or "no quantized ops"
        text = f"lowbit[{self.target}]: lowered {done}"
        if self.fallbacks:
            reasons = Counter(f"{f.op} ({f.reason})" for f in self.fallbacks)
            text += "; reference arithmetic for " + "; ".join(f"{r} x{n}" for r, n in reasons.items())
        return text


def _value(node: object) -> torch.Tensor | None:
    """The fake tensor a graph node computes (``val`` in lowbit's and aot graphs, ``example_value`` in
    dynamo's), None for a constant or a node without one."""
    value = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def node_shape(node: object) -> tuple[int, ...] | None:
    value = _value(node)
    return None if value is None else tuple(value.shape)


def node_dtype(node: object) -> torch.dtype:
    """The dtype a graph node computes (float32 where its fake value is unknown)."""
    value = _value(node)
    return torch.float32 if value is None else value.dtype


def _layer(node: torch.fx.Node) -> str:
    """The lowbit layer a node came from: its annotation, or (in a dynamo graph, which has no
    lowbit meta) the name of the first ``lowbit_params`` buffer it reads."""
    info = node.meta.get(LAYER_KEY)
    if info is not None:
        return info.path
    for arg in node.all_input_nodes:
        grapharg = arg.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else arg.name
        if PARAMS in source:
            return source.rsplit("'", 2)[-2].rsplit("__", 1)[0] if "'" in source else source
    return ""


def translate(gm: torch.fx.GraphModule, target: str, table: dict[object, Chooser]) -> TranslationReport:
    """Retarget every ``torch.ops.lowbit`` node of ``gm`` in place; returns the report. Every node's
    form is chosen before any is retargeted, so a chooser reads its inputs as lowbit ops."""
    report = TranslationReport(target)
    chosen = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in REFERENCES:
            continue
        op = node.target._opname
        report.found[op] += 1
        fn, reason = table[node.target](node) if node.target in table else (REFERENCES[node.target], None)
        if reason is not None:
            report.fallbacks.append(Fallback(node.name, op, _layer(node), reason))
        elif fn is not REFERENCES[node.target]:
            report.lowered[op] += 1
        chosen.append((node, fn))
    for node, fn in chosen:
        node.target = fn
    gm.recompile()
    return report
