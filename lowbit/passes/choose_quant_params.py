"""Turn calibration statistics and weights into quantization parameters (the layer-wise baseline).

This is the baseline DGQ compares against (Q-Diffusion / TFMQ-DM without reconstruction):
- weights: symmetric, one scale per output channel, the range either min-max or searched to
  minimise the Lp error (Q-Diffusion: 80 candidate clipping ratios in 1% steps, p = 2.4);
- activations: asymmetric, one scale and zero point per tensor, chosen from the observed
  min/max, one pair per calibrated timestep (TFMQ-DM) or one pair overall (static);
- attention probabilities: uniform at the activation bit-width over [0, observed max].
Results go to ``ctx.params`` under "<layer path>:<operand>".
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.params import OperandParams, asymmetric, target_name
from lowbit.ir.statistics import ObservationStore, RangeStatistics
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["ChooseQuantParams", "activation_params", "weight_params"]

WeightRange = Literal["minmax", "mse"]
_MSE_STEPS, _MSE_P = 80, 2.4
_EPS = 1e-8  # the smallest scale, as in lowbit.ir.params.asymmetric


def _weight_scale(w: torch.Tensor, spec: QuantSpec, method: WeightRange) -> torch.Tensor:
    flat = w.detach().float().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1).clamp_min(_EPS)
    if method == "minmax":
        return amax / spec.qmax
    best_err = torch.full_like(amax, float("inf"))
    best = amax / spec.qmax
    for i in range(_MSE_STEPS):
        scale = amax * (1.0 - 0.01 * i) / spec.qmax
        q = torch.clamp(torch.round(flat / scale[:, None]), spec.qmin, spec.qmax) * scale[:, None]
        err = (q - flat).abs().pow(_MSE_P).sum(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def weight_params(w: torch.Tensor, spec: QuantSpec, method: WeightRange) -> OperandParams:
    """Symmetric per-output-channel integer weights."""
    if spec.granularity != "channel" or not spec.symmetric:
        raise ValueError("the baseline quantizes weights symmetrically per output channel")
    scale = _weight_scale(w, spec, method)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w.detach().float() / scale.reshape(shape)), spec.qmin, spec.qmax)
    return OperandParams(spec, scale, torch.zeros_like(scale), qvalues=OperandParams.weight_storage(spec, q))


def _bounds(stats: RangeStatistics, exclude_column: int | None) -> tuple[float, float]:
    if exclude_column is None:
        return stats.min, stats.max
    keep = torch.ones_like(stats.channel_max, dtype=torch.bool)
    keep[exclude_column] = False
    return float(stats.channel_min[keep].min()), float(stats.channel_max[keep].max())


def activation_params(target: str, store: ObservationStore, spec: QuantSpec, exclude_column: int | None = None) -> OperandParams:
    """Per-tensor parameters, one row per calibrated timestep or one overall.

    Uniform: asymmetric over the observed [min, max]. Log2 (attention probabilities): the scale is
    the observed maximum (DGQ eq. 2), with no zero point. ``exclude_column`` leaves a column out
    of the range (the start token that split_start_token keeps in full precision).
    """
    if target not in store.stats:
        raise PassError(f"no calibration statistics for {target}: was this layer executed by the calibration inputs?")
    if spec.granularity != "tensor":
        raise PassError(f"{target}: the baseline quantizes activations per tensor, not per {spec.granularity}")
    per_t = spec.mode == "per_step"
    steps = store.timesteps(target) if per_t else []
    stats = [store.stats[target][t] for t in steps] if per_t else [store.overall(target)]
    lo, hi = (torch.tensor(v) for v in zip(*(_bounds(s, exclude_column) for s in stats)))
    if spec.scheme == "log2":
        scale, zero_point = hi.clamp_min(_EPS), torch.zeros_like(hi)
    else:
        scale, zero_point = asymmetric(lo, hi, spec)
    if per_t:
        return OperandParams(spec, scale, zero_point, timesteps=torch.tensor(steps, dtype=torch.float32))
    return OperandParams(spec, scale[0], zero_point[0])


class ChooseQuantParams(Pass):
    name = "choose_quant_params"
    phase = "decide"
    requires = ("insert_observers",)

    def __init__(self, weight_range: WeightRange = "minmax"):
        if weight_range not in ("minmax", "mse"):
            raise ValueError(f"weight_range must be 'minmax' or 'mse'; got {weight_range!r}")
        self.weight_range = weight_range

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = 0
        for node in gm.graph.nodes:
            annotation = node.meta.get(QUANT_KEY)
            if annotation is None:
                continue
            path = node.meta[LAYER_KEY].path
            for operand, spec in annotation.operands().items():
                target = target_name(path, operand)
                if spec.mode == "dynamic":
                    continue  # computed at run time from the tensor itself
                if operand == "weight":
                    weight = node.args[1]
                    ctx.params[target] = weight_params(fetch_attr(gm, weight.target), spec, self.weight_range)
                else:
                    column = annotation.start_token if operand == "probs" else None
                    ctx.params[target] = activation_params(target, ctx.observations, spec, column)
                chosen += 1
        # The graph itself is unchanged: parameters live in the context until convert_to_quantized_ops.
        return PassResult(gm, modified=chosen > 0)
