"""Decide which operands are quantized, and how, by attaching QuantAnnotations.

This is where a recipe's precision (``ctx.precision``, ``lowbit.ir.precision``) meets the graph:
every linear and convolution gets an input and a weight spec, every canonical attention a spec for
Q, K, V and its probabilities, at the bit-widths its ``[layers."pattern"]`` overrides resolve to.
A layer set to ``float`` stays in floating point, and so do the model's input and output layers
when ``keep_io_layers`` is set (Q-Diffusion and DGQ keep conv_in / conv_out in full precision; for
transformers these are the patch embedding and the final projection) unless a layer table says
``float = false`` for them. A pattern that matches no layer is an error, not a silent no-op.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantAnnotation, QuantSpec
from lowbit.ir.precision import LayerPrecision, Precision, PrecisionError
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


def _specs(precision: Precision, layer: LayerPrecision, has_timestep: bool) -> tuple[QuantSpec, QuantSpec, QuantSpec]:
    """(weight, activation, probabilities) specs of one layer. Per-step activation ranges fall
    back to static ones in a graph without a step input."""
    mode = precision.activation_mode if has_timestep else "static"
    weight = QuantSpec(layer.weight_bits, granularity="channel", axis=0, symmetric=True)
    activation = QuantSpec(layer.activation_bits, mode=mode)
    probs = QuantSpec(layer.attention_bits, scheme=precision.attention_scheme,
                      mode="dynamic" if precision.dynamic_attention_scale else mode)
    return weight, activation, probs


class AnnotateQuantization(Pass):
    name = "annotate_quantization"
    requires = ("canonicalize_attention",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        precision = ctx.precision
        if precision is None:
            raise PassError(f"{self.name} reads the recipe's precision from the pass context: PassContext(precision=...)")
        layers = [n for n in gm.graph.nodes if LAYER_KEY in n.meta]
        try:
            precision.check_patterns(n.meta[LAYER_KEY].path for n in layers)
        except PrecisionError as err:
            raise PassError(str(err)) from None
        io = _io_layers(gm) if precision.keep_io_layers else set()
        has_timestep = any(n.op == "placeholder" and n.name == ctx.timestep_arg for n in gm.graph.nodes)
        modified = False
        for node in layers:
            info = node.meta[LAYER_KEY]
            layer = precision.resolve(info.path)
            keep_float = layer.keep_float if layer.keep_float is not None else info.path in io
            weight, activation, probs = _specs(precision, layer, has_timestep)
            if keep_float:
                annotation = None
            elif info.kind == "attention":
                if not precision.quantize_attention:
                    continue
                annotation = QuantAnnotation(query=activation, key=activation, value=activation, probs=probs)
            else:
                annotation = QuantAnnotation(input=activation, weight=weight)
            if node.meta.get(QUANT_KEY) != annotation:
                if annotation is None:
                    node.meta.pop(QUANT_KEY, None)
                else:
                    node.meta[QUANT_KEY] = annotation
                modified = True
        return PassResult(gm, modified)
