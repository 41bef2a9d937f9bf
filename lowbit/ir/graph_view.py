"""A networkx view of a captured graph, for structural analysis.

Passes that reconstruct block by block (BRECQ/AdaRound) or reason about dataflow need to know
which nodes form an attention, a transformer block or a ResNet block. The captured graph's
``nn_module_stack`` says which module each node ran in; the kind of a module is decided from
what it contains, not from its class name, so renamed or new model families work as well:

- attention: the innermost module containing an attention (SDPA, or a canonicalized softmax);
- transformer block: the innermost module containing an attention and, outside it, at least
  two linear layers (the feed-forward);
- ResNet block: the innermost module with at least two convolutions, a group norm and no
  attention.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import torch
import torch.fx

from lowbit.ir.annotations import ATTENTION_KEY, LAYER_KEY

__all__ = ["Block", "find_blocks", "to_networkx"]

BlockKind = Literal["attention", "transformer", "resnet"]

_ATTENTION_TARGETS = {torch.ops.aten.scaled_dot_product_attention.default}
_GROUP_NORM = {torch.ops.aten.group_norm.default}


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Directed dataflow graph: one vertex per fx node (by name), with op, target and layer path."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        layer = node.meta.get(LAYER_KEY)
        graph.add_node(node.name, op=node.op, target=str(node.target), layer=layer.path if layer else None)
        for user in node.users:
            graph.add_edge(node.name, user.name)
    return graph


@dataclass(frozen=True)
class Block:
    """A module of the model that later passes treat as one unit."""

    kind: BlockKind
    path: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]  # paths of the weighted layers inside, in graph order


def _is_attention(node: torch.fx.Node) -> bool:
    return node.target in _ATTENTION_TARGETS or ATTENTION_KEY in node.meta


def _module_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def find_blocks(gm: torch.fx.GraphModule) -> list[Block]:
    """Attention, transformer and ResNet blocks of a captured graph, in graph order."""
    members: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        for path in _module_paths(node):
            members[path].append(node)

    def contains(path: str, pred) -> list[torch.fx.Node]:
        return [n for n in members[path] if pred(n)]

    def innermost(candidates: set[str]) -> set[str]:
        return {p for p in candidates if not any(q != p and q.startswith(p + ".") for q in candidates)}

    attention = innermost({p for p in members if contains(p, _is_attention)})

    def ffn_linears(path: str) -> list[torch.fx.Node]:
        return [
            n for n in members[path]
            if LAYER_KEY in n.meta and n.meta[LAYER_KEY].kind == "linear"
            and not any(n.meta[LAYER_KEY].path.startswith(a + ".") for a in attention)
        ]

    transformer = innermost({
        p for p in members
        if p not in attention and contains(p, _is_attention) and len(ffn_linears(p)) >= 2
    })
    resnet = innermost({
        p for p in members
        if not contains(p, _is_attention)
        and len(contains(p, lambda n: LAYER_KEY in n.meta and n.meta[LAYER_KEY].kind == "conv2d")) >= 2
        and contains(p, lambda n: n.target in _GROUP_NORM)
    })
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    blocks = []
    for kind, paths in (("attention", attention), ("transformer", transformer), ("resnet", resnet)):
        for path in paths:
            nodes = members[path]
            layers = tuple(dict.fromkeys(n.meta[LAYER_KEY].path for n in nodes if LAYER_KEY in n.meta))
            blocks.append(Block(kind, path, tuple(n.name for n in nodes), layers))
    return sorted(blocks, key=lambda b: order[b.nodes[0]])
