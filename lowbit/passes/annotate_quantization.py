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


def _activation(bits: float, mode: str, per_token: bool) -> QuantSpec:
    """A static or per-step range per tensor; a dynamic one per token (each vector along the last
    axis, tokens along axis -2) or per tensor."""
    if mode == "dynamic" and per_token:
        return QuantSpec(bits, mode=mode, granularity="token", axis=-2)
    return QuantSpec(bits, mode=mode)


def _annotation(precision: Precision, layer: LayerPrecision, kind: str, has_step: bool) -> QuantAnnotation:
    """One layer's annotation. Per-step activation ranges fall back to static ones in a graph
    without a step input; dynamic ones quantize linear inputs, Q and K per token and V (and a
    convolution's input) per tensor (LiteVAR §4)."""
    mode = precision.activation_mode if has_step or precision.activation_mode == "dynamic" else "static"
    if kind != "attention":
        return QuantAnnotation(input=_activation(layer.activation_bits, mode, per_token=kind == "linear"),
                               weight=QuantSpec(layer.weight_bits, granularity="channel", axis=0, symmetric=True))
    probs = None
    if precision.quantize_probs:
        probs = QuantSpec(layer.attention_bits, scheme=precision.attention_scheme,
                          mode="dynamic" if precision.dynamic_attention_scale or mode == "dynamic" else mode)
    query_key = _activation(layer.qkv_bits, mode, per_token=True)
    return QuantAnnotation(query=query_key, key=query_key, value=_activation(layer.qkv_bits, mode, per_token=False), probs=probs)


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
        has_step = any(n.op == "placeholder" and n.name == ctx.step_arg for n in gm.graph.nodes)
        modified = False
        for node in layers:
            info = node.meta[LAYER_KEY]
            layer = precision.resolve(info.path)
            keep_float = layer.keep_float if layer.keep_float is not None else info.path in io
            if info.kind == "attention" and not precision.quantize_attention and not keep_float:
                continue
            annotation = None if keep_float else _annotation(precision, layer, info.kind, has_step)
            if node.meta.get(QUANT_KEY) != annotation:
                if annotation is None:
                    node.meta.pop(QUANT_KEY, None)
                else:
                    node.meta[QUANT_KEY] = annotation
                modified = True
        return PassResult(gm, modified)
