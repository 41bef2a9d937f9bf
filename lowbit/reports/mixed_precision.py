"""Raise the layers a low setting hurts most, within a cost budget (LiteVAR §4, Tables 2-3).

From the sensitivity rows of the low recipe (``lowbit.reports.sensitivity``), raising a group to a
higher setting (``w8a8``, ``w8a16``, ... or ``float``) is taken to recover the error the group
causes alone — an estimate: the groups' errors do not add exactly, and the higher setting keeps an
error of its own. What raising a group costs is counted exactly, on the calibrated graph with that
group alone raised (BOPs per call, or bytes); both add up over groups, so choosing greedily by error
recovered per unit of cost while the total stays within ``budget`` times the uniform recipe's cost
keeps the budget. The chosen recipe is counted once more as a whole, and the last chosen groups are
dropped should it not fit (it does when costs add up; the check costs one graph).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from lowbit.core.calibrated import Calibrated
from lowbit.core.quantize import calibrate
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe, get_recipe
from lowbit.reports.sensitivity import GroupBy, Sensitivity, bops_and_size, measure

__all__ = ["Metric", "MixedPrecision", "assign", "check_request", "mixed_precision", "parse_setting"]

Metric = Literal["bops", "size"]


def parse_setting(setting: str) -> tuple[float, float] | None:
    """``"w8a8"`` -> (weight bits, activation bits); ``"float"`` -> None."""
    if setting == "float":
        return None
    match = re.fullmatch(r"w(\d+(?:\.\d+)?)a(\d+(?:\.\d+)?)", setting)
    if not match:
        raise ValueError(f"raise_to {setting!r}: give 'float' or 'wXaY' with X and Y bit-widths, e.g. 'w8a8' or 'w8a16'")
    return float(match[1]), float(match[2])


def check_request(budget: float, raise_to: str) -> None:
    """Refuse a budget or setting that cannot work, before any calibration."""
    if budget < 1:
        raise ValueError(f"budget {budget:g} is below 1: the uniform recipe itself would not fit")
    parse_setting(raise_to)


@dataclass(frozen=True)
class MixedPrecision:
    """The mixed recipe, the sensitivity table it was chosen from, and what it costs."""

    recipe: Recipe
    sensitivity: list[Sensitivity]
    raised: list[str]  # the groups raised, in the order chosen
    metric: Metric
    budget: float  # times the uniform recipe's cost
    uniform_cost: float  # BOPs per call (mean over the kept samples) or bytes
    mixed_cost: float

    def summary(self) -> str:
        unit, scale = ("GBOPs/call", 1e9) if self.metric == "bops" else ("MB", 2**20)
        return (f"{self.recipe.name}: {len(self.raised)} group(s) raised ({', '.join(self.raised) or 'none'}); "
                f"{self.mixed_cost / scale:.4g} {unit} against {self.uniform_cost / scale:.4g} uniform "
                f"({self.mixed_cost / self.uniform_cost:.3f}x, budget {self.budget:g}x)")


def _raised_table(calibrated: Calibrated, group: str, setting: str) -> dict:
    """The ``[layers."group"]`` table that raises every layer of ``group`` to ``setting`` and lowers none:
    each field the higher of the setting's and what the group's layers already have."""
    bits = parse_setting(setting)
    if bits is None:
        return {"float": True}
    precision = calibrated.recipe.precision
    layers = [precision.resolve(p) for p in calibrated.quantized_layers() if fnmatch.fnmatchcase(p, group)]
    w, a = bits
    return {"weight_bits": max([w] + [x.weight_bits for x in layers]),
            **{f: max([a] + [getattr(x, f) for x in layers]) for f in ("activation_bits", "qkv_bits", "attention_bits")}}


def _with_overrides(recipe: Recipe, tables: dict[str, dict], setting: str, budget: float) -> Recipe:
    data = recipe.to_dict()
    layers = data.setdefault("layers", {})
    for group, table in tables.items():
        layers[group] = {**layers.pop(group, {}), **table}  # re-inserted last: where patterns overlap the later wins
    data["name"] = f"{recipe.name}-mp{budget:g}x"
    data["description"] = f"{recipe.name} with its most sensitive layer groups raised to {setting} within {budget:g}x its cost"
    return Recipe.from_dict(data, f"mixed precision from {recipe.name}")


def _cost(calibrated: Calibrated, recipe: Recipe, metric: Metric) -> float:
    model: QuantizedModel = calibrated.variant(precision=recipe.precision)
    bops, size = bops_and_size(model, calibrated)
    return bops if metric == "bops" else size


def assign(calibrated: Calibrated, rows: list[Sensitivity], *, budget: float, metric: Metric = "bops",
           raise_to: str = "w8a8") -> MixedPrecision:
    """The groups of ``rows`` to raise to ``raise_to`` so that the cost stays within ``budget`` times the
    uniform recipe's, chosen by error recovered per unit of cost; groups that raising does not change
    (already at the setting) are left out."""
    check_request(budget, raise_to)
    recipe = calibrated.recipe
    uniform = _cost(calibrated, recipe, metric)
    limit = budget * uniform
    tables = {row.group: _raised_table(calibrated, row.group, raise_to) for row in rows}
    extra = {g: _cost(calibrated, _with_overrides(recipe, {g: t}, raise_to, budget), metric) - uniform for g, t in tables.items()}
    chosen, spent = [], 0.0
    for row in sorted((r for r in rows if extra[r.group] > 0), key=lambda r: -r.relative_error / extra[r.group]):
        if uniform + spent + extra[row.group] <= limit:
            chosen.append(row.group)
            spent += extra[row.group]
    while True:
        mixed_recipe = _with_overrides(recipe, {g: tables[g] for g in chosen}, raise_to, budget)
        mixed = _cost(calibrated, mixed_recipe, metric)
        if mixed <= limit or not chosen:
            return MixedPrecision(mixed_recipe, rows, chosen, metric, budget, uniform, mixed)
        chosen.pop()


def mixed_precision(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *, budget: float = 1.1,
                    metric: Metric = "bops", raise_to: str = "w8a8", by: GroupBy = "type", samples: int = 8,
                    step_arg: str | None = "timestep", progress: bool = True) -> MixedPrecision:
    """A recipe that raises ``recipe``'s most sensitive layer groups (``by`` type or single layer) to
    ``raise_to`` within ``budget`` times its ``metric`` (BOPs per call, or model size), with the
    sensitivity table it was chosen from. One capture and one calibration pass in all."""
    recipe = get_recipe(recipe)
    check_request(budget, raise_to)  # refused before the long work
    calibrated = calibrate(model, recipe, calibration, step_arg=step_arg, keep=samples, progress=progress)
    return assign(calibrated, measure(calibrated, by, progress=progress), budget=budget, metric=metric, raise_to=raise_to)
