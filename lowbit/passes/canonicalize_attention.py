"""Rewrite every attention into one canonical form whose probabilities are a visible tensor.

Diffusers models reach attention through fused SDPA (AttnProcessor2_0, the joint processors of
SD3 and FLUX) or through an explicit softmax(QKᵀ)V (the classic AttnProcessor's baddbmm /
softmax / bmm). Later passes — observers, the probability quantizers of DGQ eq. 8-9, the
start-token split, MDWA masks — all need the probability tensor, so both forms become the form
documented in ``lowbit/ir/attention.py``. Each attention is annotated with an AttentionInfo:
self (keys from the same tensor as queries), cross (keys from another input, the text tokens)
joint (keys concatenated from several inputs, as in SD3/FLUX) or cached (keys of earlier steps,
graph inputs, followed by this call's own: VAR's KV cache), with the graph inputs the keys come
from and their token counts (for a cache, the sizes at capture: they change from step to step).
"""

from __future__ import annotations

import math

import torch
import torch.fx

from lowbit.ir.annotations import ATTENTION_KEY, LAYER_KEY, AttentionInfo, LayerInfo
from lowbit.ir.attention import emit_canonical_attention
from lowbit.ir.capture import module_path, unique_path
from lowbit.ir.graph_edit import erase_unused
from lowbit.passes.base import Pass, PassContext, PassResult

__all__ = ["CanonicalizeAttention"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default}


def _data_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first argument that carries data (not a parameter or a constant)."""
    for arg in node.args:
        if isinstance(arg, torch.fx.Node) and arg.op != "get_attr":
            return arg
    return None


def _walk_to(node: torch.fx.Node | None, stop) -> torch.fx.Node | None:
    """Follow data inputs upstream until ``stop`` holds; the graph is acyclic, so this ends."""
    while node is not None and not stop(node):
        node = _data_input(node)
    return node


def _projection_input(node: torch.fx.Node) -> torch.fx.Node | None:
    proj = _walk_to(node, lambda n: n.op == "placeholder" or n.target in _PROJECTIONS)
    return None if proj is None or proj.op == "placeholder" else _data_input(proj)


def _source(node: torch.fx.Node) -> str:
    found = _walk_to(node, lambda n: n.op == "placeholder")
    return found.name if found is not None else "unknown"


def _describe_keys(q: torch.fx.Node, k: torch.fx.Node) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    cat = _walk_to(k, lambda n: n.op == "placeholder" or n.target in _PROJECTIONS or n.target == aten.cat.default)
    if cat is not None and cat.target == aten.cat.default:
        dim = cat.args[1] if len(cat.args) > 1 else 0
        parts = cat.args[0]
        lengths = tuple(int(p.meta["val"].shape[dim]) for p in parts)
        *earlier, new = parts
        if earlier and all(p.op == "placeholder" for p in earlier) and _projection_input(new) is _projection_input(q):
            return "cached", tuple(p.name for p in earlier) + (_source(new),), lengths
        return "joint", tuple(_source(p) for p in parts), lengths
    tokens = int(k.meta["val"].shape[-2])
    k_in, q_in = _projection_input(k), _projection_input(q)
    same = k_in is q_in if k_in is not None else _source(k) == _source(q)
    return ("self" if same else "cross"), (_source(k_in if k_in is not None else k),), (tokens,)


def _explicit_attention(softmax: torch.fx.Node):
    """(q, k, v, mask, scale, output) of the classic diffusers attention — baddbmm(mask, q, kᵀ,
    beta, alpha), softmax, bmm — or None for anything else (left as it is)."""
    if softmax.target not in (aten.softmax.int, aten._softmax.default) or ATTENTION_KEY in softmax.meta:
        return None
    scores = softmax.args[0]
    users = list(softmax.users)
    if len(users) == 1 and users[0].target == aten._to_copy.default:
        users = list(users[0].users)
    out = [u for u in users if u.target in (aten.bmm.default, aten.matmul.default) and u.args[0] in (softmax, *softmax.users)]
    if len(out) != 1 or len(users) != 1 or scores.target != aten.baddbmm.default:
        return None
    mask, q, kt = scores.args[:3]
    beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
    if beta not in (0, 1) or kt.target != aten.transpose.int:
        return None  # a scaled mask has no canonical form; keep the graph exact
    return q, kt.args[0], out[0].args[1], mask if beta == 1 else None, float(alpha), out[0]


class CanonicalizeAttention(Pass):
    name = "canonicalize_attention"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        count = 0
        paths = {n.meta[LAYER_KEY].path for n in graph.nodes if LAYER_KEY in n.meta}
        for node in list(graph.nodes):
            if node.target == _SDPA:
                args = list(node.args) + [None] * (7 - len(node.args))
                q, k, v, mask, dropout, causal = args[:6]
                causal = node.kwargs.get("is_causal", causal or False)
                if (dropout or node.kwargs.get("dropout_p", 0.0)) or causal or node.kwargs.get("enable_gqa"):
                    continue  # not met in diffusion denoisers at inference; left fused
                mask = node.kwargs.get("attn_mask", mask)
                scale = node.kwargs.get("scale") or 1.0 / math.sqrt(q.meta["val"].shape[-1])
                replaced = node
            else:
                found = _explicit_attention(node)
                if found is None:
                    continue
                q, k, v, mask, scale, replaced = found
            kind, sources, lengths = _describe_keys(q, k)
            path = unique_path(module_path(replaced), paths)
            with graph.inserting_before(replaced):
                probs, out = emit_canonical_attention(graph, q, k, v, mask, scale)
            shape = q.meta["val"].shape
            probs.meta[ATTENTION_KEY] = AttentionInfo(
                kind=kind, module=path, key_sources=sources, key_lengths=lengths,
                heads=int(shape[-3]) if len(shape) == 4 else 1, scale=float(scale), has_mask=mask is not None,
            )
            probs.meta[LAYER_KEY] = LayerInfo(path=path, kind="attention")
            for new in (probs, out):
                new.meta["nn_module_stack"] = replaced.meta.get("nn_module_stack", {})
            replaced.replace_all_uses_with(out)
            erase_unused(replaced)
            count += 1
        if count:
            gm.recompile()
        return PassResult(gm, modified=count > 0)
