"""Which layers a low bit-width hurts: each layer, or each layer type, quantized alone (LiteVAR §4, Fig. 5).

The model is calibrated once for the low recipe; then, for every group — one layer, or one layer type
(every block's ``ffn.fc2``: the path with its block indices as ``*``) — a copy of the calibrated graph
is quantized with only that group's layers annotated, the rest left in floating point, and run on the
kept calibration samples. The damage is the relative L2 error of the prediction (the first output)
against the same graph with nothing quantized, over all those samples together: sqrt(Σ‖q − f‖² / Σ‖f‖²). Each row also
counts what quantizing the group saves (BOPs per call, bytes), which a budgeted assignment of
higher bit-widths weighs the error against (``lowbit.reports.mixed_precision``).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from lowbit.core.calibrated import Calibrated
from lowbit.core.distributed import map_sharded, rank, world_size
from lowbit.core.quantize import calibrate
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe
from lowbit.reports.accounting import costs

__all__ = ["GroupBy", "Sensitivity", "bops_and_size", "layer_types", "markdown", "measure", "plot", "sensitivity", "write_csv"]

GroupBy = Literal["layer", "type"]


def layer_types(paths: Iterable[str]) -> dict[str, str]:
    """Each layer's type: its path with every block index as ``*`` (``blocks.3.ffn.fc2`` -> ``blocks.*.ffn.fc2``),
    which is also a ``[layers."…"]`` pattern matching every layer of the type. An index is a block index
    where layers whose paths read the same around it (other indices aside) take several values there;
    positions inside one module (``ff.net.0.proj`` against ``ff.net.2``) stay, so they are two types."""
    parts = {p: p.split(".") for p in paths}

    def around(s: list[str], i: int) -> tuple:
        return tuple("*" if x.isdigit() else x for x in s[:i]), tuple("*" if x.isdigit() else x for x in s[i + 1:])

    values: dict[tuple, set[str]] = defaultdict(set)
    for s in parts.values():
        for i, x in enumerate(s):
            if x.isdigit():
                values[around(s, i)].add(x)
    return {p: ".".join("*" if x.isdigit() and len(values[around(s, i)]) > 1 else x for i, x in enumerate(s))
            for p, s in parts.items()}


@dataclass(frozen=True)
class Sensitivity:
    group: str  # a layer path, or a layer type (a pattern)
    kind: str  # linear, conv or attention
    layers: int
    relative_error: float  # of the model's prediction with this group alone quantized
    gbops_saved: float  # per call (mean over the kept samples), against the same graph in floating point
    bytes_saved: float


def bops_and_size(model: QuantizedModel, calibrated: Calibrated) -> tuple[float, float]:
    """(BOPs per call averaged over the kept samples — a VAR step's cost depends on its scale — and bytes)."""
    per_call = costs(model, [((), inputs) for inputs in calibrated.samples], step_arg=calibrated.context.step_arg)
    return sum(c.bops for c in per_call) / len(per_call), per_call[0].size_bytes


def _prediction(model: QuantizedModel, inputs: dict) -> torch.Tensor:
    """The model's first floating-point output: a denoiser's prediction, a VAR step's logits (its cache
    outputs are left out: their error reaches later scales' logits, which one step cannot follow)."""
    out = model.graph_module(**inputs)
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()).float()


@torch.no_grad()
def measure(calibrated: Calibrated, by: GroupBy = "type", *, progress: bool = True) -> list[Sensitivity]:
    """One row per group of the layers the recipe quantizes, the most damaging first; under torchrun the
    groups are shared out between the processes and every process gets every row."""
    if not calibrated.samples:
        raise ValueError("sensitivity needs kept calibration samples: calibrate(..., keep=N) with N >= 1")
    groups: dict[str, list[str]] = {}
    kinds = calibrated.quantized_layers()
    types = layer_types(kinds)
    for path in kinds:
        groups.setdefault(types[path] if by == "type" else path, []).append(path)
    floating = calibrated.variant(only=set())
    reference = [_prediction(floating, inputs) for inputs in calibrated.samples]
    base_bops, base_size = bops_and_size(floating, calibrated)
    bar = tqdm(total=math.ceil(len(groups) / world_size()), desc=f"sensitivity per {by}", disable=not progress or rank() != 0,
               leave=False)

    def alone(group: str) -> Sensitivity:
        paths = groups[group]
        model = calibrated.variant(only=set(paths))
        err2 = ref2 = 0.0
        for inputs, fp in zip(calibrated.samples, reference):
            err2 += float((_prediction(model, inputs) - fp).pow(2).sum())
            ref2 += float(fp.pow(2).sum())
        bops, size = bops_and_size(model, calibrated)
        bar.update(1)
        return Sensitivity(group, "/".join(sorted({kinds[p] for p in paths})), len(paths), math.sqrt(err2 / ref2),
                           (base_bops - bops) / 1e9, base_size - size)

    rows = map_sharded(alone, list(groups))  # under torchrun each process tries every n-th group
    bar.close()
    return sorted(rows, key=lambda r: -r.relative_error)


def sensitivity(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *, by: GroupBy = "type",
                samples: int = 8, step_arg: str | None = "timestep", progress: bool = True) -> list[Sensitivity]:
    """Each layer (``by="layer"``) or layer type (``by="type"``) of ``model`` quantized alone with ``recipe``,
    measured on ``samples`` of the calibration samples; one calibration pass in all."""
    calibrated = calibrate(model, recipe, calibration, step_arg=step_arg, keep=samples, progress=progress)
    return measure(calibrated, by, progress=progress)


def markdown(rows: list[Sensitivity]) -> str:
    lines = ["| rank | group | kind | layers | relative error alone | GBOPs saved / call | KB saved |",
             "|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {i} | `{r.group}` | {r.kind} | {r.layers} | {r.relative_error:.4g} | {r.gbops_saved:.4g} | {r.bytes_saved / 1024:.4g} |"
              for i, r in enumerate(rows, 1)]
    return "\n".join(lines)


def write_csv(rows: list[Sensitivity], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Sensitivity.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot(rows: list[Sensitivity], path: Path, title: str, raised: Iterable[str] = ()) -> None:
    """A bar per group, the most damaging on top (LiteVAR's Fig. 5 in kind); ``raised`` groups in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    shown = rows[:40]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.2))
    raised = set(raised)
    ax.barh(range(len(shown)), [r.relative_error for r in shown], color=["tab:blue" if r.group in raised else "tab:red" for r in shown])
    if raised:
        ax.legend(handles=[matplotlib.patches.Patch(color="tab:red", label="kept at the low setting"),
                           matplotlib.patches.Patch(color="tab:blue", label="raised by the budgeted assignment")], fontsize=8)
    ax.set_yticks(range(len(shown)), [r.group for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("relative L2 error of the prediction, this group alone quantized")
    ax.set_title(title + ("" if len(rows) <= len(shown) else f" (top {len(shown)} of {len(rows)})"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
