"""Decide which operands are quantized, and how, by attaching QuantAnnotations.

This is where a recipe's choices meet the graph: every linear and convolution gets an input
and a weight spec, every canonical attention a spec for Q, K, V and its probabilities. Layers
named by ``keep_fp`` (fnmatch patterns on module paths) stay in full precision, and so do the
model's input and output layers when ``keep_io_layers`` is set (Q-Diffusion and DGQ keep
conv_in / conv_out in full precision; for transformers these are the patch embedding and the
final projection). A pattern that matches no layer is an error, not a silent no-op.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantAnnotation, QuantSpec
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["AnnotateQuantization"]


def _io_layers(gm: torch.fx.GraphModule) -> set[str]:
    """Paths of the first weighted layer fed by the first graph input and of the last one."""
    weighted = [n for n in gm.graph.nodes if LAYER_KEY in n.meta and n.meta[LAYER_KEY].kind != "attention"]
    if not weighted:
        return set()
    first_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    reached: set[torch.fx.Node] = {first_input}
    first = None
    for node in gm.graph.nodes:
        if any(isinstance(a, torch.fx.Node) and a in reached for a in node.args):
            if node in weighted:
                first = node
                break
            reached.add(node)
    return {n.meta[LAYER_KEY].path for n in (first, weighted[-1]) if n is not None}


class AnnotateQuantization(Pass):
    name = "annotate_quantization"
    requires = ("canonicalize_attention",)

    def __init__(self, weight: QuantSpec, activation: QuantSpec, probs: QuantSpec | None,
                 keep_fp: tuple[str, ...] = (), keep_io_layers: bool = True, quantize_attention: bool = True):
        self.weight, self.activation, self.probs = weight, activation, probs
        self.keep_fp, self.keep_io_layers, self.quantize_attention = tuple(keep_fp), keep_io_layers, quantize_attention

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = [n for n in gm.graph.nodes if LAYER_KEY in n.meta]
        paths = [n.meta[LAYER_KEY].path for n in layers]
        for pattern in self.keep_fp:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise PassError(
                    f"keep_fp pattern {pattern!r} matches no layer of this model; layer paths look like "
                    f"{', '.join(sorted(set(paths))[:5])}, ..."
                )
        kept = {p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in self.keep_fp)}
        if self.keep_io_layers:
            kept |= _io_layers(gm)
        has_timestep = any(n.op == "placeholder" and n.name == ctx.timestep_arg for n in gm.graph.nodes)

        def for_graph(spec: QuantSpec | None) -> QuantSpec | None:
            """Per-timestep specs fall back to static in a graph without a timestep input."""
            if spec is None or has_timestep or spec.mode != "per_timestep":
                return spec
            return QuantSpec.from_dict({**spec.to_dict(), "mode": "static"})

        act, probs = for_graph(self.activation), for_graph(self.probs)
        modified = False
        for node in layers:
            info = node.meta[LAYER_KEY]
            if info.path in kept:
                annotation = None
            elif info.kind == "attention":
                if not self.quantize_attention:
                    continue
                annotation = QuantAnnotation(query=act, key=act, value=act, probs=probs)
            else:
                annotation = QuantAnnotation(input=act, weight=self.weight)
            if node.meta.get(QUANT_KEY) != annotation:
                if annotation is None:
                    node.meta.pop(QUANT_KEY, None)
                else:
                    node.meta[QUANT_KEY] = annotation
                modified = True
        return PassResult(gm, modified)
