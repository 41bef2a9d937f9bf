"""Outlier-preserving group quantization of activations (DGQ eq. 6-7).

Along the dimension detect_outlier_dim chose (or always along channels, for the ablation
without dimension selection), the vectors' (min, max) ranges are clustered into K groups with
K-means (scikit-learn, ``random_state=0``: deterministic, as in the official code). Each group
gets its own scale and zero point from the group's range, so the few outlier channels or pixels
keep a grid of their own instead of stretching everyone else's. Clustering is redone for every
calibrated timestep, so both the assignment and the scales are per timestep (eq. 7).

Grouping along tokens is skipped (channels are grouped instead) for operands whose token axis
holds text positions (``OutlierDim.text_tokens``): a text position's range depends on the words
the calibration prompts put there, so on other prompts the fitted group ranges clip — measured
on the reference model (``bench/dgq_grouping.py``), cross-attention keys and values grouped by
text position lost 4.8% of their norm to clipping on held-out phrasings (up to 9%), grouped by
channel 1.0%, per tensor 0.06%. ``group_text_tokens=True`` restores plain eq. 5 for the ablation.

For the same reason an operand with one token per sample whose values vary between the
calibration samples keeps one range: each channel's range there is a handful of per-prompt values
(SD3's and FLUX's conditioning vectors, into which the pooled text embedding is folded, and the
adaLN linears they feed), and held-out prompts fall outside group ranges fitted to them — measured
on the random-weight SD3 and FLUX configs (``bench/attention_scheme.py``), grouping them cost
dgq-w8a6-auto 6 dB against min-max. A single token that does not vary within a step (a timestep
embedding) keeps its groups: their ranges are exact.

K = 1 gives one group spanning every vector, which is exactly the per-tensor baseline.
The assignment is expanded into one scale per vector, shaped to broadcast against the operand,
so the quantized ops need no new code. Convolution inputs are grouped on their own pixels (not
on the im2col columns, which would quantize one pixel differently in each receptive field).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, OUTLIER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.operands import activation_operands, broadcast_shape
from lowbit.ir.params import OperandParams, asymmetric, target_name
from lowbit.ir.statistics import RangeStatistics
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["GroupActivations", "cluster_ranges"]

_GROUPED = ("input", "query", "key", "value")


def cluster_ranges(vmin: torch.Tensor, vmax: torch.Tensor, k: int) -> np.ndarray:
    """Group label of every vector, from K-means on its (min, max) point."""
    points = torch.stack([vmin, vmax], 1).double().numpy()
    k = min(k, len(np.unique(points, axis=0)))
    if k <= 1:
        return np.zeros(len(points), dtype=np.int64)
    from sklearn.cluster import KMeans  # scikit-learn loads only when a recipe groups activations

    return KMeans(n_clusters=k, random_state=0, n_init=10).fit_predict(points).astype(np.int64)


def _ranges(stats: RangeStatistics, dim: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (stats.channel_min, stats.channel_max) if dim == "channel" else (stats.token_min, stats.token_max)


class GroupActivations(Pass):
    name = "group_activations"
    phase = "decide"
    requires = ("choose_quant_params",)

    def __init__(self, groups: int = 8, select_dim: bool = True, group_text_tokens: bool = False):
        if groups < 1:
            raise ValueError(f"groups must be at least 1; got {groups}")
        self.num_groups, self.select_dim, self.group_text_tokens = groups, select_dim, group_text_tokens

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            annotation = node.meta.get(QUANT_KEY)
            if annotation is None:
                continue
            path = node.meta[LAYER_KEY].path
            updated = {}
            for operand, (value, layout) in activation_operands(node).items():
                spec = getattr(annotation, operand)
                if operand not in _GROUPED or spec is None or spec.mode == "dynamic":
                    continue
                dim = self._dimension(node, operand)
                target = target_name(path, operand)
                steps = ctx.observations.timesteps(target) if spec.mode == "per_step" else [None]
                labels, scales, zero_points = [], [], []
                for t in steps:
                    stats = ctx.observations.stats[target][t] if t is not None else ctx.observations.overall(target)
                    vmin, vmax = _ranges(stats, dim)
                    label = cluster_ranges(vmin, vmax, self._groups(stats))
                    index = torch.from_numpy(label)
                    k = int(label.max()) + 1
                    lo = torch.full((k,), float("inf")).scatter_reduce(0, index, vmin, "amin")
                    hi = torch.full((k,), float("-inf")).scatter_reduce(0, index, vmax, "amax")
                    scale, zero_point = asymmetric(lo, hi, spec)
                    labels.append(tuple(label.tolist()))
                    scales.append(scale[index])
                    zero_points.append(zero_point[index])
                shape = broadcast_shape(tuple(value.meta["val"].shape), layout, dim)
                axis = (-1 if layout == "channels_last" else 1) if dim == "channel" else (1 if layout == "channels_last" else 2)
                grouped = QuantSpec.from_dict({**spec.to_dict(), "granularity": "group", "axis": axis,
                                               "groups": [list(row) for row in labels]})
                stack = lambda rows: torch.stack(rows).reshape(len(rows), *shape)  # noqa: E731
                if spec.mode == "per_step":
                    ctx.params[target] = OperandParams(grouped, stack(scales), stack(zero_points),
                                                       timesteps=torch.tensor(steps, dtype=torch.float32))
                else:
                    ctx.params[target] = OperandParams(grouped, scales[0].reshape(shape), zero_points[0].reshape(shape))
                updated[operand] = grouped
            if updated:
                node.meta[QUANT_KEY] = dataclasses.replace(annotation, **updated)
                modified = True
        return PassResult(gm, modified)

    def _groups(self, stats: RangeStatistics) -> int:
        """K, or 1 for an operand with one token per sample whose values vary between samples (module docstring)."""
        per_prompt = stats.token_min.numel() == 1 and bool((stats.channel_min < stats.channel_max).any())
        return 1 if per_prompt else self.num_groups

    def _dimension(self, node: torch.fx.Node, operand: str) -> str:
        if not self.select_dim:
            return "channel"
        found = node.meta.get(OUTLIER_KEY, {})
        if operand not in found:
            raise PassError(f"node '{node.name}' ({node.meta[LAYER_KEY].path}:{operand}) has no outlier dimension; "
                            f"run detect_outlier_dim before {self.name}, or set select_dim=False")
        outlier = found[operand]
        if outlier.text_tokens and not self.group_text_tokens:
            return "channel"
        return outlier.chosen
