"""Small graph-editing helpers every rewriting pass needs.

New nodes get a fake ``meta["val"]`` (shape, dtype, symbolic batch) computed from their inputs'
fake values, as torch.export gives its own nodes, so later passes can read shapes of nodes that
earlier passes inserted. Dead nodes are erased explicitly rather than with fx's
``eliminate_dead_code``, which would also drop the export's guard call.
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

__all__ = ["call", "erase_unused", "fetch_attr"]


def call(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` at the insertion point, with its fake value."""
    node = graph.call_function(target, args, kwargs or {})
    vals = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a, (args, kwargs or {}))
    leaves = [v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    # the mode of the graph's own fake values, not an ambient one (a torch.compile backend runs
    # passes inside dynamo's tracing context, whose fake mode is another)
    mode = next((v.fake_mode for v in leaves if isinstance(v, FakeTensor)), None)
    if mode is not None and all(not isinstance(a, torch.fx.Node) or "val" in a.meta for a in pytree.tree_leaves((args, kwargs))):
        fake = pytree.tree_map(lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v, vals)
        with mode:
            node.meta["val"] = target(*fake[0], **fake[1])
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
