"""Choose the attention layers that share their output across classifier-free guidance (ASC, LiteVAR §3).

A layer shares when the relative L1 difference of its unconditional half's attention output from the
conditional half's, over the calibration samples that insert_cfg_observers summed, is at most
``threshold`` (DiTFastAttn's rule; ``inf``, the default, shares every layer as LiteVAR does). Which
half is conditional is the model's ``cfg_layout`` recorded at capture, or the ``layout`` setting.
The choice is the ``cfg_sharing`` artifact (``lowbit.ir.cfg_sharing``); convert_to_quantized_ops makes
each shared attention compute the conditional half and copy it onto the other.
"""

from __future__ import annotations

import math

import torch.fx

from lowbit.ir.attention import attention_layers
from lowbit.ir.capture import CFG_LAYOUT_KEY, CFG_LAYOUTS
from lowbit.ir.cfg_sharing import CFG_SHARING, CFGSharing, difference_target
from lowbit.passes.base import Pass, PassContext, PassError, PassResult, measured

__all__ = ["ChooseCFGSharing"]


class ChooseCFGSharing(Pass):
    name = "choose_cfg_sharing"
    phase = "decide"
    requires = ("insert_cfg_observers",)

    def __init__(self, threshold: float = math.inf, layout: str = "model"):
        if not threshold >= 0:
            raise ValueError(f"threshold (relative L1 difference) must be >= 0; got {threshold}")
        if layout not in ("model",) + CFG_LAYOUTS:
            raise ValueError(f"layout must be 'model' (the model's cfg_layout) or one of {CFG_LAYOUTS}; got {layout!r}")
        self.threshold, self.layout = threshold, layout

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = attention_layers(gm.graph)
        if not layers:
            return PassResult(gm, modified=False)
        layout = gm.meta.get(CFG_LAYOUT_KEY) if self.layout == "model" else self.layout
        if layout is None:
            raise PassError(f"{self.name}: the model does not say which half of its CFG batches is conditional: give it a "
                            f"cfg_layout attribute ({' or '.join(CFG_LAYOUTS)}; diffusers pipelines batch [negative; "
                            f"prompt], i.e. unconditional_first) or set this pass's layout")
        ctx.artifacts[CFG_SHARING] = CFGSharing.decide(measured(ctx, self.name, layers, difference_target), layout,
                                                       self.threshold)
        return PassResult(gm, modified=True)
