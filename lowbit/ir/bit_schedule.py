"""Progressive bit-width schedules for quantization-aware training (FraQAT §3.2).

A schedule is a list of stages, each (bits above the final bit-width, relative length), scaled
to a step budget. Stating the bits as a distance above each layer's final bit-width lets one
schedule serve every layer of a mixed recipe: at W4 FraQAT's 8 → 7 → 6 → 5.5 → 5 → 4.75 → 4.5 →
4.25 → 4 is the distances 4, 3, 2, 1.5, 1, 0.75, 0.5, 0.25, 0, and a layer kept at 8 bits goes
12 → … → 8 alongside (capped at 16 bits).

FraQAT gives its stages in epochs (1, 1, 1, 1, 1, 2, 2, 2, 14: :data:`FRAQAT_SCHEDULE`); the
baselines' stage lengths are not in the paper, so lowbit chooses them in their recipes
(``qat-int.toml``, ``qat-halving.toml``): each spends half the budget at the final bit-width, as
FraQAT spends 14 of 25 epochs, and splits the rest equally.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate

__all__ = ["FRAQAT_SCHEDULE", "BitSchedule"]

# 8 → 7 → 6 → 5.5 → 5 → 4.75 → 4.5 → 4.25 → 4 at W4
FRAQAT_SCHEDULE = ((4, 1), (3, 1), (2, 1), (1.5, 1), (1, 1), (0.75, 2), (0.5, 2), (0.25, 2), (0, 14))


@dataclass(frozen=True)
class BitSchedule:
    """``stages`` of (bits above the final bit-width, relative length) spread over ``steps`` steps."""

    stages: tuple[tuple[float, float], ...]
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple((float(b), float(w)) for b, w in self.stages))
        if self.steps < 1:
            raise ValueError(f"the step budget must be at least 1; got {self.steps}")
        if not self.stages or any(w <= 0 or b < 0 for b, w in self.stages):
            raise ValueError(f"a schedule is a non-empty list of [bits above the final, length > 0] pairs with bits >= 0; "
                             f"got {[list(s) for s in self.stages]}")
        if self.stages[-1][0] != 0:
            raise ValueError(f"a schedule must end at the final bit-width (distance 0); it ends {self.stages[-1][0]:g} above")

    def starts(self) -> list[int]:
        """The first step of each stage (a stage too short for the budget gets no step and is skipped)."""
        total = sum(w for _, w in self.stages)
        ends = [round(self.steps * c / total) for c in accumulate(w for _, w in self.stages)]
        return [0] + ends[:-1]

    def above_final(self, step: int) -> float:
        """The distance above the final bit-width at ``step`` (0-based)."""
        starts = self.starts()
        return self.stages[bisect.bisect_right(starts, step) - 1][0]
