"""Find, for every quantized activation, the dimension its outliers lie along (DGQ eq. 4-5).

DGQ observes that activation outliers of text-to-image models sit in a few channels for some
layers and in a few pixels (tokens) for others, and groups along whichever dimension shows the
larger range spread D_d = (max_i a_max - min_i a_max) + (max_i a_min - min_i a_min). The
per-channel and per-token ranges come from the calibration statistics, merged over timesteps by
min/max as in the official code. A convolution's input is judged in its unfolded (im2col) view,
as the official code does: rows are (channel, kernel offset) — a channel's range, plus the zeros
of the padding — and columns are output pixels — the range over each receptive field. The
result is recorded per operand under OUTLIER_KEY; group quantization reads it.

The pass also records whether an operand's token axis holds text positions, because DGQ's
grouping along pixels rests on outliers staying at the same positions when the prompt changes
(§3.2), which holds for image pixels and not for text tokens: which word sits at text position j
depends on the phrasing. An operand has text tokens when it is a cross-attention's key or value
(or any operand of a joint attention, whose token axis includes the text segment), or a
linear input computed from the text input with as many tokens as the text.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from lowbit.ir.annotations import ATTENTION_KEY, LAYER_KEY, OUTLIER_KEY, QUANT_KEY, OutlierDim
from lowbit.ir.params import target_name
from lowbit.ir.statistics import RangeStatistics, spread
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["DetectOutlierDim", "conv_unfold_ranges"]

_ACTIVATIONS = ("input", "query", "key", "value")


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v), int(v))


def conv_unfold_ranges(stats: RangeStatistics, height: int, width: int, kernel, stride, padding, dilation):
    """Row (channel x offset) and column (output pixel) ranges of the im2col view of a conv input."""
    padded = any(p > 0 for p in _pair(padding))
    row_min = stats.channel_min.clamp_max(0) if padded else stats.channel_min
    row_max = stats.channel_max.clamp_min(0) if padded else stats.channel_max
    grid_max = stats.token_max.reshape(1, 1, height, width)
    grid_min = stats.token_min.reshape(1, 1, height, width)
    ph, pw = _pair(padding)
    pool = dict(kernel_size=_pair(kernel), stride=_pair(stride), dilation=_pair(dilation))
    col_max = F.max_pool2d(F.pad(grid_max, (pw, pw, ph, ph), value=0.0), **pool).flatten()
    col_min = -F.max_pool2d(F.pad(-grid_min, (pw, pw, ph, ph), value=0.0), **pool).flatten()
    return (row_min, row_max), (col_min, col_max)


def _text_dependent(gm: torch.fx.GraphModule, text: torch.fx.Node | None) -> set[torch.fx.Node]:
    """Nodes computed (directly or not) from the text input."""
    found: set[torch.fx.Node] = set()
    if text is None:
        return found
    for node in gm.graph.nodes:
        if node is text or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


class DetectOutlierDim(Pass):
    name = "detect_outlier_dim"
    phase = "decide"
    requires = ("insert_observers",)
    before = ("group_activations",)

    def __init__(self, text_input: str = "encoder_hidden_states"):
        self.text_input = text_input

    def _text_operands(self, node: torch.fx.Node, text: torch.fx.Node | None, from_text: set[torch.fx.Node]) -> set[str]:
        if text is None:
            return set()
        attention = node.meta.get(ATTENTION_KEY)
        if attention is not None:
            if self.text_input not in attention.key_sources:
                return set()
            return {"key", "value"} if attention.kind == "cross" else {"query", "key", "value"} if attention.kind == "joint" else set()
        x = node.args[0]
        tokens = x.meta["val"].shape[1:-1].numel() if x.meta["val"].dim() > 2 else 0
        return {"input"} if node.meta[LAYER_KEY].kind == "linear" and x in from_text and tokens == text.meta["val"].shape[1] else set()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        text = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == self.text_input), None)
        from_text = _text_dependent(gm, text)
        for node in gm.graph.nodes:
            annotation = node.meta.get(QUANT_KEY)
            if annotation is None:
                continue
            info = node.meta[LAYER_KEY]
            text_operands = self._text_operands(node, text, from_text)
            found = {}
            for operand in _ACTIVATIONS:
                if getattr(annotation, operand) is None:
                    continue
                target = target_name(info.path, operand)
                if target not in ctx.observations.stats:
                    raise PassError(f"no calibration statistics for {target}: run calibration before {self.name}")
                stats = ctx.observations.overall(target)
                if info.kind == "conv2d":
                    x, weight = node.args[0], node.args[1]
                    h, w = x.meta["val"].shape[-2:]
                    args = list(node.args) + [None] * (7 - len(node.args))
                    rows, cols = conv_unfold_ranges(stats, int(h), int(w), weight.meta["val"].shape[-2:],
                                                    args[3] or 1, args[4] or 0, args[5] or 1)
                    found[operand] = OutlierDim(spread(*rows), spread(*cols))
                else:
                    found[operand] = OutlierDim(spread(stats.channel_min, stats.channel_max),
                                                spread(stats.token_min, stats.token_max), operand in text_operands)
            if found and node.meta.get(OUTLIER_KEY) != found:
                node.meta[OUTLIER_KEY] = found
                modified = True
        return PassResult(gm, modified)
