"""The canonical attention form and how to read it back.

canonicalize_attention rewrites every attention into these aten nodes, so the probabilities
are a visible tensor that observers and quantizers can attach to::

    kt     = aten.transpose.int(k, -2, -1)
    scores = aten.matmul.default(q, kt)
    scaled = aten.mul.Tensor(scores, scale)
    masked = aten.add.Tensor(scaled, mask)            # float mask, or
           | aten.masked_fill.Scalar(scaled, ~mask, -inf)  # bool mask (keep where True)
    probs  = aten.softmax.int(masked, -1)          <- ATTENTION_KEY, LAYER_KEY(kind="attention")
    out    = aten.matmul.default(probs, v)

Scores and the softmax run in float32 whatever the input dtype, as SDPA does internally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from lowbit.ir.annotations import ATTENTION_KEY, LAYER_KEY
from lowbit.ir.graph_edit import call

__all__ = ["AttentionOperands", "attention_layers", "attention_softmaxes", "emit_canonical_attention", "parse_canonical_attention"]

aten = torch.ops.aten


@dataclass(frozen=True)
class AttentionOperands:
    """The nodes of one canonical attention."""

    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    mask: torch.fx.Node | None  # as given to SDPA: bool (keep where True) or additive float
    scale: float
    probs: torch.fx.Node
    output: torch.fx.Node


def _val(node: torch.fx.Node):
    return node.meta.get("val")


def emit_canonical_attention(graph: torch.fx.Graph, q, k, v, mask, scale: float) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Insert the canonical form at the graph's current insertion point; returns (probs, out)."""
    dtype = _val(q).dtype if _val(q) is not None else torch.float32
    if dtype != torch.float32:
        q = call(graph, aten._to_copy.default, (q,), {"dtype": torch.float32})
        k = call(graph, aten._to_copy.default, (k,), {"dtype": torch.float32})
    kt = call(graph, aten.transpose.int, (k, -2, -1))
    scores = call(graph, aten.matmul.default, (q, kt))
    scores = call(graph, aten.mul.Tensor, (scores, scale))
    if mask is not None:
        if _val(mask) is not None and _val(mask).dtype == torch.bool:
            scores = call(graph, aten.masked_fill.Scalar, (scores, call(graph, aten.logical_not.default, (mask,)), float("-inf")))
        else:
            scores = call(graph, aten.add.Tensor, (scores, mask))
    probs = call(graph, aten.softmax.int, (scores, -1))
    weights = probs if dtype == torch.float32 else call(graph, aten._to_copy.default, (probs,), {"dtype": dtype})
    out = call(graph, aten.matmul.default, (weights, v))
    return probs, out


def _skip_casts(node: torch.fx.Node) -> torch.fx.Node:
    while node.target == aten._to_copy.default:
        node = node.args[0]
    return node


def parse_canonical_attention(probs: torch.fx.Node) -> AttentionOperands:
    """Read q, k, v, mask, scale and output back from an annotated softmax node."""
    if ATTENTION_KEY not in probs.meta or probs.target != aten.softmax.int:
        raise ValueError(f"node {probs.name} is not a canonical attention softmax")
    node, mask = probs.args[0], None
    if node.target == aten.add.Tensor:
        node, mask = node.args
    elif node.target == aten.masked_fill.Scalar:
        node, mask = node.args[0], node.args[1].args[0]
    scale = node.args[1]
    scores = node.args[0]
    q, kt = scores.args
    k = kt.args[0]
    users = [u for u in probs.users]
    if len(users) == 1 and users[0].target == aten._to_copy.default:
        users = list(users[0].users)
    output = next(u for u in users if u.target == aten.matmul.default)
    return AttentionOperands(_skip_casts(q), _skip_casts(k), output.args[1], mask, float(scale), probs, output)


def attention_softmaxes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Every canonical attention's softmax (its probabilities), in graph order."""
    return [n for n in graph.nodes if LAYER_KEY in n.meta and n.meta[LAYER_KEY].kind == "attention"]


def attention_layers(graph: torch.fx.Graph) -> list[str]:
    """The layer path of every canonical attention, in graph order."""
    return [probs.meta[LAYER_KEY].path for probs in attention_softmaxes(graph)]
