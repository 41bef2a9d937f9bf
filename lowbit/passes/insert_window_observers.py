"""Insert, on every canonical attention, an observer of where its probability mass lies (LiteVAR §2).

MDWA's window search needs, per layer, step, head and key part, the attention mass at each distance
from the part's diagonal over the calibration samples; LiteVAR saves 80 samples' maps to disk. Here
an ``AttentionMassObserver`` adds each call's maps into per-distance sums
(``lowbit.ir.attention_window_statistics``), so calibration memory does not grow with the number of
samples. Every attention is observed, quantized or not: windows are independent of precision. The
key parts come from the model's ``step_tokens`` (recorded at capture): a VAR step's keys are the
tokens of every scale so far. ``geometry`` "band" measures distance along the flattened indices
(LiteVAR's official code); "grid" measures it on each square part's 2-D grid (Chebyshev), so the
windows become squares around the query's position in each scale or image.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.attention import attention_softmaxes
from lowbit.ir.attention_window_statistics import GEOMETRIES
from lowbit.ir.attention_windows import mass_target
from lowbit.ir.capture import STEP_TOKENS_KEY
from lowbit.ir.observers import AttentionMassObserver, attach_observer, step_input
from lowbit.passes.base import Pass, PassContext, PassResult

__all__ = ["InsertWindowObservers"]


class InsertWindowObservers(Pass):
    name = "insert_window_observers"
    phase = "observe"
    requires = ("canonicalize_attention",)

    def __init__(self, geometry: str = "band"):
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}; got {geometry!r}")
        self.geometry = geometry

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        step, step_tokens = step_input(gm, ctx.step_arg), gm.meta.get(STEP_TOKENS_KEY) or None
        attentions = attention_softmaxes(gm.graph)
        for i, probs in enumerate(attentions):
            observer = AttentionMassObserver(mass_target(probs.meta[LAYER_KEY].path), probs.name, step_tokens, self.geometry)
            attach_observer(gm, f"window{i}", observer, (probs, step), after=probs)
        if attentions:
            gm.recompile()
        return PassResult(gm, modified=bool(attentions))
