"""Insert, on every canonical attention's output, an observer of how far apart the two halves of a
classifier-free-guidance batch are (LiteVAR §3, Fig. 2b; DiTFastAttn's criterion).

choose_cfg_sharing decides from these numbers which layers may compute their attention for the
conditional half only. Every attention is observed, quantized or not; the statistic is three sums per
layer and step (``lowbit.ir.cfg_statistics``), so calibration memory does not grow with the samples.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.attention import attention_softmaxes, parse_canonical_attention
from lowbit.ir.cfg_sharing import difference_target
from lowbit.ir.observers import CFGDifferenceObserver, attach_observer, step_input
from lowbit.passes.base import Pass, PassContext, PassResult

__all__ = ["InsertCFGObservers"]


class InsertCFGObservers(Pass):
    name = "insert_cfg_observers"
    phase = "observe"
    requires = ("canonicalize_attention",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        step = step_input(gm, ctx.step_arg)
        attentions = attention_softmaxes(gm.graph)
        for i, probs in enumerate(attentions):
            output = parse_canonical_attention(probs).output
            observer = CFGDifferenceObserver(difference_target(probs.meta[LAYER_KEY].path), output.name)
            attach_observer(gm, f"cfg{i}", observer, (output, step, probs), after=output)
        if attentions:
            gm.recompile()
        return PassResult(gm, modified=bool(attentions))
