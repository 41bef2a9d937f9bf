"""Choose each attention layer's probability quantizer from calibration (``attention_scheme = "auto"``).

For every attention whose probabilities are annotated with the undecided scheme "auto",
insert_observers measured, per step, the error each candidate — uniform and log2 grids, with and
without the start-token column kept exact (where split_start_token marked one) — would put into the
attention's output (``lowbit.ir.attention_statistics``); this pass keeps, per layer, the candidate
with the least error over the calibrated steps (``lowbit.ir.attention_schemes``). The choice is the
``attention_schemes`` artifact, and the annotations are rewritten with it so that the passes after
this one (ranges, fake quantizers) quantize what convert will emit.
"""

from __future__ import annotations

import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.attention_schemes import ATTENTION_SCHEMES, AttentionSchemes, errors_target
from lowbit.passes.base import Pass, PassContext, PassResult, measured

__all__ = ["ChooseAttentionScheme"]


class ChooseAttentionScheme(Pass):
    name = "choose_attention_scheme"
    phase = "decide"
    requires = ("insert_observers",)
    before = ("choose_quant_params", "insert_fake_quantizers")  # both read the probabilities' scheme

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        undecided = {n.meta[LAYER_KEY].path: n for n in gm.graph.nodes
                     if QUANT_KEY in n.meta and n.meta[QUANT_KEY].probs is not None and n.meta[QUANT_KEY].probs.scheme == "auto"}
        if not undecided:
            return PassResult(gm, modified=False)
        schemes = AttentionSchemes.decide(measured(ctx, self.name, list(undecided), errors_target))
        for path, node in undecided.items():
            node.meta[QUANT_KEY] = schemes.apply(path, node.meta[QUANT_KEY])
        ctx.artifacts[ATTENTION_SCHEMES] = schemes
        return PassResult(gm, modified=True)
