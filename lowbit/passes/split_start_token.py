"""Keep the start-token column of cross-attention probabilities in full precision (DGQ eq. 8-9).

In text-to-image cross-attention most of each query's probability mass sits on the text's start
token (Figure 5: a peak near 1.0, strongest on background pixels). Quantized together with the
rest, that peak either takes the whole grid or is clipped; dropping it ruins the image. DGQ
splits it out: A·V = [A₀ V₀, s·2^(−A_q) V₁:], the start column exact and the rest log2-quantized.
This pass records the column to split on each cross-attention's QuantAnnotation; the quantized
attention op (and each lowering) performs the split. The column is the first token of the text
segment: 0 for cross-attention, and for joint attention (SD3, FLUX; opt-in, DGQ only studies
cross-attention) the offset of the ``text_input`` segment among the concatenated keys.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from lowbit.ir.annotations import ATTENTION_KEY, QUANT_KEY
from lowbit.passes.base import Pass, PassContext, PassResult

__all__ = ["SplitStartToken"]


class SplitStartToken(Pass):
    name = "split_start_token"
    requires = ("annotate_quantization",)
    before = ("choose_quant_params",)  # the static range of the probabilities must leave the column out

    def __init__(self, include_joint: bool = False, text_input: str = "encoder_hidden_states"):
        self.include_joint, self.text_input = include_joint, text_input

    def _column(self, info) -> int | None:
        if info.kind == "cross":
            return 0
        if info.kind == "joint" and self.include_joint and self.text_input in info.key_sources:
            return sum(info.key_lengths[: info.key_sources.index(self.text_input)])
        return None

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            annotation, info = node.meta.get(QUANT_KEY), node.meta.get(ATTENTION_KEY)
            if annotation is None or info is None or annotation.probs is None:
                continue
            column = self._column(info)
            if column is not None and annotation.start_token != column:
                node.meta[QUANT_KEY] = dataclasses.replace(annotation, start_token=column)
                modified = True
        return PassResult(gm, modified)
