"""Choose LiteVAR's multi-diagonal attention windows (MDWA, §2) from calibration.

For every attention layer, step and head, and every part of the key axis past the first
``full_parts`` (LiteVAR keeps the parts of scales 1-3 whole), the narrowest band whose share of the
part's attention mass reaches ``ratio`` (R0; 1 keeps everything) over the calibration samples that
insert_window_observers summed. The windows are the ``attention_windows`` artifact
(``lowbit.ir.attention_windows``); convert_to_quantized_ops hands each attention op its step's row.
"""

from __future__ import annotations

import torch.fx

from lowbit.ir.attention import attention_layers
from lowbit.ir.attention_windows import ATTENTION_WINDOWS, AttentionWindows, mass_target
from lowbit.passes.base import Pass, PassContext, PassResult, measured

__all__ = ["ChooseAttentionWindows"]


class ChooseAttentionWindows(Pass):
    name = "choose_attention_windows"
    phase = "decide"
    requires = ("insert_window_observers",)

    def __init__(self, ratio: float = 0.95, full_parts: int = 3):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio (LiteVAR's R0) must be in (0, 1]; got {ratio}")
        if full_parts < 0:
            raise ValueError(f"full_parts must be >= 0; got {full_parts}")
        self.ratio, self.full_parts = ratio, full_parts

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = attention_layers(gm.graph)
        if not layers:
            return PassResult(gm, modified=False)
        ctx.artifacts[ATTENTION_WINDOWS] = AttentionWindows.decide(measured(ctx, self.name, layers, mass_target),
                                                                   self.ratio, self.full_parts)
        return PassResult(gm, modified=True)
