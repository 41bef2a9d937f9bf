"""The activation operands of a quantized node, and how their channels are laid out.

A linear's input is (batch, *tokens, C); a convolution's (batch, C, *pixels); an attention's
query, key and value (batch, heads, tokens, head_dim), its probabilities (batch, heads,
queries, keys). Observers, outlier detection and grouping all need the same answer.
"""

from __future__ import annotations

import torch.fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.attention import parse_canonical_attention
from lowbit.ir.statistics import Layout

__all__ = ["activation_operands", "broadcast_shape"]


def activation_operands(node: torch.fx.Node) -> dict[str, tuple[torch.fx.Node, Layout]]:
    """Operand name -> (the node producing it, its layout), for a layer or canonical attention node."""
    kind = node.meta[LAYER_KEY].kind
    if kind == "attention":
        ops = parse_canonical_attention(node)
        return {name: (value, "channels_last") for name, value in
                (("query", ops.q), ("key", ops.k), ("value", ops.v), ("probs", ops.probs))}
    return {"input": (node.args[0], "channels_first" if kind == "conv2d" else "channels_last")}


def broadcast_shape(shape: tuple[int, ...], layout: Layout, dim: str) -> tuple[int, ...]:
    """Shape of a per-vector parameter along ``dim`` ("channel" or "token") that broadcasts
    against a tensor of ``shape`` (batch first; the batch itself is left out).

    Symbolic sizes that export could not simplify (SDXL's add_embedding input is
    8·((6·s0)//s0) + 32) are read at their value for the captured inputs.
    """
    shape = tuple(optimization_hint(d) for d in shape)
    if layout == "channels_last":
        return (shape[-1],) if dim == "channel" else tuple(shape[1:-1]) + (1,)
    return (shape[1],) + (1,) * (len(shape) - 2) if dim == "channel" else tuple(shape[2:])
