"""Pipelines are data: an ordered list of named passes whose ordering constraints are checked.

The names of the passes applied to a graph are kept in ``gm.meta[HISTORY_KEY]``, so a pipeline
that continues another one's work (convert after calibration, load after capture) checks its
ordering constraints against what really ran. Running a pipeline verifies the IR at entry and after every pass, stamps each node a pass
inserted with that pass's name, and records a per-pass report (what changed, where, how long).
A pass that fails is reported with its name and the passes that already ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx

from lowbit.ir.annotations import CREATED_BY_KEY
from lowbit.ir.verify import verify
from lowbit.passes.base import Pass, PassContext, PassError

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
    seconds: float

    def summary(self) -> str:
        if not self.modified:
            return f"{self.name}: no change ({self.seconds:.2f}s)"
        return (f"{self.name}: +{len(self.added)} nodes, -{len(self.removed)} nodes, "
                f"{len(self.annotated)} annotated ({self.seconds:.2f}s)")


def _snapshot(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: tuple(n.meta.get(k) for k in _META_KEYS) for n in gm.graph.nodes}


@dataclass
class Pipeline:
    passes: list[Pass]
    records: list[PassRecord] = field(default_factory=list)

    def check_order(self, history: list[str]) -> None:
        seen = list(history)
        for p in self.passes:
            missing = [r for r in p.requires if r not in seen]
            if missing:
                raise PassError(
                    f"pipeline order: pass '{p.name}' requires {missing} to run before it; "
                    f"already applied {history}, order given {[q.name for q in self.passes]}"
                )
            seen.append(p.name)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        done: list[str] = gm.meta.setdefault(HISTORY_KEY, [])
        self.check_order(done)
        verify(gm, "pipeline entry")
        for p in self.passes:
            before = _snapshot(gm)
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
            except Exception as err:
                raise PassError(f"pass '{p.name}' failed (after {done or 'no passes'}): {err}") from err
            result.graph_module.meta.setdefault(HISTORY_KEY, done)
            gm = result.graph_module
            after = _snapshot(gm)
            added = tuple(n for n in after if n not in before)
            for node in gm.graph.nodes:
                if node.name in added:
                    node.meta.setdefault(CREATED_BY_KEY, p.name)
            record = PassRecord(
                name=p.name,
                modified=result.modified,
                added=added,
                removed=tuple(n for n in before if n not in after),
                annotated=tuple(n for n in after if n in before and after[n] != before[n]),
                seconds=time.perf_counter() - start,
            )
            if not result.modified and (record.added or record.removed or record.annotated):
                raise PassError(f"pass '{p.name}' changed the graph but reported modified=False")
            self.records.append(record)
            verify(gm, f"pass '{p.name}'")
            done.append(p.name)
        return gm

    def report(self) -> str:
        return "\n".join(r.summary() for r in self.records)
