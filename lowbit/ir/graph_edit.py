"""Small graph-editing helpers every rewriting pass needs.

New nodes get a fake ``meta["val"]`` (shape, dtype, symbolic batch) computed from their inputs'
fake values, as torch.export gives its own nodes, so later passes can read shapes of nodes that
earlier passes inserted. Dead nodes are erased explicitly rather than with fx's
``eliminate_dead_code``, which would also drop the export's guard call.
"""

from __future__ import annotations

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

__all__ = ["call", "erase_unused", "fetch_attr"]


def call(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` at the insertion point, with its fake value."""
    node = graph.call_function(target, args, kwargs or {})
    vals = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a, (args, kwargs or {}))
    leaves = [v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(leaves)
    if mode is not None and all(not isinstance(a, torch.fx.Node) or "val" in a.meta for a in pytree.tree_leaves((args, kwargs))):
        with mode:
            node.meta["val"] = target(*vals[0], **vals[1])
    return node


def erase_unused(node: torch.fx.Node) -> None:
    """Erase ``node`` if nothing uses it, then its inputs that become unused in turn."""
    if node.users or node.op in ("placeholder", "output"):
        return
    inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
    node.graph.erase_node(node)
    for arg in inputs:
        erase_unused(arg)


def fetch_attr(gm: torch.nn.Module, target: str):
    """The parameter, buffer or submodule at a dotted ``get_attr`` target."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
