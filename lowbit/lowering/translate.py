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

__all__ = ["Chooser", "Fallback", "TranslationReport", "translate"]

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
    """Retarget every ``torch.ops.lowbit`` node of ``gm`` in place; returns the report."""
    report = TranslationReport(target)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in REFERENCES:
            continue
        op = node.target._opname
        report.found[op] += 1
        if node.target in table:
            fn, reason = table[node.target](node)
        else:
            fn, reason = REFERENCES[node.target], None
        if reason is not None:
            report.fallbacks.append(Fallback(node.name, op, _layer(node), reason))
        elif fn is not REFERENCES[node.target]:
            report.lowered[op] += 1
        node.target = fn
    gm.recompile()
    return report
