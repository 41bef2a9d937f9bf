"""Pipelines are data: an ordered list of named passes whose ordering constraints are checked.

The names of the passes applied to a graph are kept in ``gm.meta[HISTORY_KEY]``, so a pipeline
that continues another one's work (convert after calibration, load after capture) checks its
ordering constraints against what really ran. Running a pipeline verifies the IR at entry and
after every pass, stamps each node a pass inserted with that pass's name, and records a per-pass
report: nodes added, removed, re-annotated or rewired, context entries (parameters, artifacts)
set, and time. A pass whose ``modified`` disagrees with that record is a bug and raises; a pass
that fails is reported with its name and the passes that already ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx

from lowbit.ir.annotations import CREATED_BY_KEY
from lowbit.ir.artifacts import Artifact
from lowbit.ir.params import OperandParams
from lowbit.ir.verify import verify
from lowbit.passes.base import PHASES, Pass, PassContext, PassError

__all__ = ["HISTORY_KEY", "PassRecord", "Pipeline"]

HISTORY_KEY = "lowbit.history"

_META_KEYS = ("lowbit.layer", "lowbit.quant", "lowbit.attention", "lowbit.outlier_dim")


@dataclass(frozen=True)
class PassRecord:
    """What one pass did."""

    name: str
    modified: bool
    added: tuple[str, ...]
    removed: tuple[str, ...]
    annotated: tuple[str, ...]  # nodes whose lowbit annotations changed
    rewired: tuple[str, ...]  # nodes whose inputs changed
    context: tuple[str, ...]  # context entries set or changed ("params:<target>", "artifact:<name>")
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.annotated or self.rewired or self.context)

    def summary(self) -> str:
        if not self.modified:
            return f"{self.name}: no change ({self.seconds:.2f}s)"
        return (f"{self.name}: +{len(self.added)} nodes, -{len(self.removed)} nodes, {len(self.annotated)} annotated, "
                f"{len(self.rewired)} rewired, {len(self.context)} context entries ({self.seconds:.2f}s)")


def _graph_snapshot(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    """Per node: its lowbit annotations and the names of its inputs (to see rewired edges)."""
    return {n.name: (tuple(n.meta.get(k) for k in _META_KEYS), tuple(a.name for a in n.all_input_nodes)) for n in gm.graph.nodes}


def _fingerprint(value: object) -> tuple:
    """Identity and in-place version of a context entry's tensors: changes whether a pass replaces
    the entry or writes into it."""
    tensors = value.tensors() if isinstance(value, OperandParams) else {}
    if isinstance(value, Artifact):
        tensors = value.encode("")[1]
    return (id(value), tuple((k, id(t), t._version) for k, t in sorted(tensors.items())))


def _context_snapshot(ctx: PassContext) -> dict[str, tuple]:
    entries = {f"params:{k}": _fingerprint(v) for k, v in ctx.params.items()}
    return entries | {f"artifact:{k}": _fingerprint(v) for k, v in ctx.artifacts.items()}


def _changed(before: dict, after: dict) -> tuple[str, ...]:
    return tuple(k for k in after.keys() | before.keys() if before.get(k) != after.get(k))


@dataclass
class Pipeline:
    passes: list[Pass]
    records: list[PassRecord] = field(default_factory=list)

    def check_order(self, history: list[str]) -> None:
        """Each pass after the passes it requires and before those it must precede, phases in
        order; the error names both passes."""
        seen = list(history)
        order = [q.name for q in self.passes]
        for i, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in seen]
            if missing:
                raise PassError(f"pipeline order: pass '{p.name}' requires {missing} to run before it; "
                                f"already applied {history}, order given {order}")
            late = [b for b in p.before if b in seen]
            if late:
                raise PassError(f"pipeline order: pass '{p.name}' must run before {late}, but "
                                f"{'it already ran' if late[0] in history else 'it comes earlier'}; order given {order}")
            if i and PHASES.index(p.phase) < PHASES.index(self.passes[i - 1].phase):
                q = self.passes[i - 1]
                raise PassError(f"pipeline order: pass '{p.name}' ({p.phase} phase) cannot follow '{q.name}' ({q.phase} "
                                f"phase); phases run in the order {', '.join(PHASES)}")
            seen.append(p.name)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        done: list[str] = gm.meta.setdefault(HISTORY_KEY, [])
        self.check_order(done)
        verify(gm, "pipeline entry")
        for p in self.passes:
            graph_before, context_before = _graph_snapshot(gm), _context_snapshot(ctx)
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
            except Exception as err:
                raise PassError(f"pass '{p.name}' failed (after {done or 'no passes'}): {err}") from err
            result.graph_module.meta.setdefault(HISTORY_KEY, done)
            gm = result.graph_module
            after = _graph_snapshot(gm)
            added = tuple(n for n in after if n not in graph_before)
            for node in gm.graph.nodes:
                if node.name in added:
                    node.meta.setdefault(CREATED_BY_KEY, p.name)
            kept = [n for n in after if n in graph_before]
            record = PassRecord(
                name=p.name,
                modified=result.modified,
                added=added,
                removed=tuple(n for n in graph_before if n not in after),
                annotated=tuple(n for n in kept if after[n][0] != graph_before[n][0]),
                rewired=tuple(n for n in kept if after[n][1] != graph_before[n][1]),
                context=tuple(sorted(_changed(context_before, _context_snapshot(ctx)))),
                seconds=time.perf_counter() - start,
            )
            if result.modified != record.changed:
                what = "changed the graph or the context but reported modified=False" if record.changed \
                    else "reported modified=True but changed neither the graph nor the context"
                raise PassError(f"pass '{p.name}' {what}")
            self.records.append(record)
            verify(gm, f"pass '{p.name}'")
            done.append(p.name)
        return gm

    def report(self) -> str:
        return "\n".join(r.summary() for r in self.records)
