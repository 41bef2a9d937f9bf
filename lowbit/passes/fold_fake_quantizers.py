"""Fold trained fake quantizers into quantization parameters: the last step of quantization-aware training.

Each weight quantizer's trained weight W + Δ becomes the layer's integer weights and scales in
``ctx.params``, at the layer's final bit-width — the parameters ``convert_to_quantized_ops`` and
``lowbit.load`` read, so a trained model saves, loads, compiles and exports like a post-training
one. The quantizer nodes are removed and the graph is again exactly the one calibration left
(without observers). Refuses while a quantizer is above its final bit-width: the schedule was not
finished.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import QUANT_KEY
from lowbit.ir.fake_quantizers import FAKE_QUANTIZERS, WeightFakeQuantizer
from lowbit.ir.graph_edit import fetch_attr
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["FoldFakeQuantizers"]


class FoldFakeQuantizers(Pass):
    name = "fold_fake_quantizers"
    phase = "decide"
    requires = ("insert_fake_quantizers",)
    before = ("convert_to_quantized_ops",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(FAKE_QUANTIZERS + ".")]
        for node in nodes:
            quantizer = gm.get_submodule(node.target)
            original = node.args[0]
            if isinstance(quantizer, WeightFakeQuantizer):
                layer = next(iter(node.users))
                try:
                    ctx.params[quantizer.target] = quantizer.final_params(fetch_attr(gm, original.target),
                                                                          layer.meta[QUANT_KEY].weight)
                except ValueError as err:
                    raise PassError(str(err)) from err
            node.replace_all_uses_with(original)
            gm.graph.erase_node(node)
        if hasattr(gm, FAKE_QUANTIZERS):
            delattr(gm, FAKE_QUANTIZERS)
        gm.recompile()
        return PassResult(gm, modified=bool(nodes))
