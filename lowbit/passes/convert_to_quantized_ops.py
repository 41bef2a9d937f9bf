"""Replace annotated layers with lowbit's quantized domain ops, using ``ctx.params``.

Linear and convolution nodes become ``lowbit.quantized_linear`` / ``lowbit.quantized_conv2d``
with integer weights; each canonical attention becomes ``lowbit.fake_quant`` on Q, K, V and one
``lowbit.quantized_attention`` (with its step's MDWA windows where ``choose_attention_windows``
chose any, and its CFG half where ``choose_cfg_sharing`` shares it, quantized or not). Per-step
parameters are stored as tables and picked by a ``lowbit.select_timestep`` node from the graph's
step input; dynamic ones are computed from the tensor by ``lowbit.dynamic_params`` nodes. Observers are removed, and full
precision weights that no node reads any more are dropped from the module. ``lowbit.load``
runs this pass on a fresh capture with saved parameters, so it must only read ``ctx.params``.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, LayerInfo, QuantAnnotation, QuantSpec
from lowbit.ir.attention import parse_canonical_attention
from lowbit.ir.attention_schemes import ATTENTION_SCHEMES
from lowbit.ir.attention_windows import ATTENTION_WINDOWS
from lowbit.ir.cfg_sharing import CFG_SHARING
from lowbit.ir.graph_edit import erase_unused
from lowbit.ir.observers import remove_observers
from lowbit.ir.params import PARAMS, OperandParams, target_name
from lowbit.ir.schema import DynamicParams, FakeQuant, QuantizedAttention, QuantizedConv2d, QuantizedLinear, SelectTimestep
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["ConvertToQuantizedOps"]


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v), int(v)]


class _Emitter:
    """Registers parameter buffers and emits the nodes that read them."""

    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext):
        self.gm, self.ctx = gm, ctx
        if not hasattr(gm, PARAMS):
            gm.add_submodule(PARAMS, torch.nn.Module())
        self.holder = getattr(gm, PARAMS)
        self.timestep = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == ctx.step_arg), None)

    def params(self, target: str, operand: torch.fx.Node) -> OperandParams:
        """``target``'s parameters, checked against the shape of the operand they quantize."""
        if target not in self.ctx.params:
            raise PassError(f"no quantization parameters for {target}; run choose_quant_params first (or load them)")
        params = self.ctx.params[target]
        try:
            params.check_fits(operand.meta["val"].shape)
        except ValueError as err:
            raise PassError(f"{target}: {err}") from err
        return params

    def buffer(self, target: str, field: str, value: torch.Tensor) -> torch.fx.Node:
        name = f"{target.replace('.', '_').replace(':', '__')}__{field}"
        self.holder.register_buffer(name, value)
        node = self.gm.graph.get_attr(f"{PARAMS}.{name}")
        node.meta["val"] = value
        return node

    def scale_and_zero_point(self, target: str, x: torch.fx.Node, spec: QuantSpec, layer: LayerInfo) -> tuple[torch.fx.Node, torch.fx.Node]:
        """The nodes giving ``x``'s quantization parameters: computed from ``x`` at run time (nodes
        of ``layer``), a buffer, or a per-step table's row for the graph's step input."""
        if spec.mode == "dynamic":
            nodes = tuple(DynamicParams(x=x, qmin=spec.qmin, qmax=spec.qmax, per_token=spec.granularity == "token",
                                        field=f).emit(self.gm.graph) for f in ("scale", "zero_point"))
            for node in nodes:
                node.meta[LAYER_KEY] = layer
            return nodes
        p = self.params(target, x)
        scale, zero_point = self.buffer(target, "scale", p.scale), self.buffer(target, "zero_point", p.zero_point)
        if p.spec.mode != "per_step":
            return scale, zero_point
        if self.timestep is None:
            raise PassError(f"{target} has per-timestep parameters but the graph has no '{self.ctx.step_arg}' input")
        steps = self.buffer(target, "timesteps", p.timesteps)
        graph = self.gm.graph
        return (SelectTimestep(table=scale, timesteps=steps, timestep=self.timestep).emit(graph),
                SelectTimestep(table=zero_point, timesteps=steps, timestep=self.timestep).emit(graph))


def _convert_weighted(em: _Emitter, node: torch.fx.Node) -> torch.fx.Node:
    path, kind = node.meta[LAYER_KEY].path, node.meta[LAYER_KEY].kind
    annotation = node.meta[QUANT_KEY]
    args = list(node.args) + [None] * (7 - len(node.args))
    x, bias = args[0], args[2]
    w = em.params(target_name(path, "weight"), node.args[1])
    weight = em.buffer(target_name(path, "weight"), "qvalues", w.qvalues)
    weight_scale = em.buffer(target_name(path, "weight"), "scale", w.scale)
    if annotation.input is not None:
        s, z = em.scale_and_zero_point(target_name(path, "input"), x, annotation.input, node.meta[LAYER_KEY])
        qmin, qmax = annotation.input.qmin, annotation.input.qmax
    else:
        s = z = None
        qmin, qmax = 0, 0
    common = dict(x=x, weight=weight, weight_scale=weight_scale, bias=bias, input_scale=s, input_zero_point=z,
                  input_qmin=qmin, input_qmax=qmax)
    if kind == "linear":
        return QuantizedLinear(**common).emit(em.gm.graph)
    stride, padding, dilation = (_pair(a if a is not None else d) for a, d in zip(args[3:6], (1, 0, 1)))
    groups = int(args[6]) if args[6] is not None else 1
    return QuantizedConv2d(**common, stride=stride, padding=padding, dilation=dilation, groups=groups).emit(em.gm.graph)


def _windows(em: _Emitter, path: str) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """The nodes giving ``path``'s MDWA windows at the graph's current step (None, None: no windows)."""
    windows = em.ctx.artifacts.get(ATTENTION_WINDOWS)
    tables = windows.tables(path) if windows is not None else None
    if tables is None:
        return None, None
    if em.timestep is None:
        raise PassError(f"{path} has attention windows per step but the graph has no '{em.ctx.step_arg}' input")
    target = target_name(path, "windows")
    steps = em.buffer(target, "timesteps", windows.steps)
    return tuple(SelectTimestep(table=em.buffer(target, field, table), timesteps=steps, timestep=em.timestep).emit(em.gm.graph)
                 for field, table in zip(("widths", "lengths"), tables))


def _convert_attention(em: _Emitter, probs: torch.fx.Node) -> torch.fx.Node:
    path = probs.meta[LAYER_KEY].path
    annotation = probs.meta.get(QUANT_KEY, QuantAnnotation())  # a float attention that windows or sharing change
    schemes = em.ctx.artifacts.get(ATTENTION_SCHEMES)
    if schemes is not None and schemes.choice(path) is not None:
        annotation = schemes.apply(path, annotation)  # on load, the rewrite passes' annotation is still "auto"
    if annotation.probs is not None and annotation.probs.scheme == "auto":
        raise PassError(f"{path}: its probability quantizer is still 'auto' (undecided): the recipe must run "
                        f"choose_attention_scheme after insert_observers (as the dgq-*-auto recipes do)")
    ops = parse_canonical_attention(probs)
    operands = []
    for name, value in (("query", ops.q), ("key", ops.k), ("value", ops.v)):
        spec = getattr(annotation, name)
        if spec is not None:
            s, z = em.scale_and_zero_point(target_name(path, name), value, spec, probs.meta[LAYER_KEY])
            value = FakeQuant(x=value, scale=s, zero_point=z, qmin=spec.qmin, qmax=spec.qmax).emit(em.gm.graph)
            value.meta[LAYER_KEY] = probs.meta[LAYER_KEY]
        operands.append(value)
    spec = annotation.probs
    ps = pz = None
    if spec is not None and spec.mode != "dynamic":
        ps, pz = em.scale_and_zero_point(target_name(path, "probs"), probs, spec, probs.meta[LAYER_KEY])
    scheme, qmin, qmax = (spec.scheme, spec.qmin, spec.qmax) if spec is not None else ("none", 0, 0)
    start = annotation.start_token if annotation.start_token is not None else -1
    dynamic = spec is not None and spec.mode == "dynamic"
    q, k, v = operands
    widths, lengths = _windows(em, path)
    sharing = em.ctx.artifacts.get(CFG_SHARING)
    op = QuantizedAttention(q=q, k=k, v=v, attn_mask=ops.mask, scale=ops.scale, probs_scale=ps, probs_zero_point=pz,
                            probs_scheme=scheme, probs_qmin=qmin, probs_qmax=qmax, start_token=start, dynamic_scale=dynamic,
                            window_widths=widths, window_lengths=lengths,
                            shared_half=sharing.computed_half(path) if sharing is not None else -1)
    return op.emit(em.gm.graph), ops.output


def _drop_unused_parameters(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


class ConvertToQuantizedOps(Pass):
    name = "convert_to_quantized_ops"
    phase = "convert"
    requires = ("annotate_quantization",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        em = _Emitter(gm, ctx)
        modified = remove_observers(gm) > 0
        rewritten = {layer for name in (ATTENTION_WINDOWS, CFG_SHARING) if name in ctx.artifacts
                     for layer in ctx.artifacts[name].layers}  # attention kept in floating point that MDWA or ASC changes
        for node in list(graph.nodes):
            if node.op != "call_function" or getattr(node.target, "namespace", None) == "lowbit":
                continue
            if QUANT_KEY not in node.meta and not (LAYER_KEY in node.meta and node.meta[LAYER_KEY].path in rewritten):
                continue
            kind = node.meta[LAYER_KEY].kind
            with graph.inserting_before(node):
                if kind == "attention":
                    new, replaced = _convert_attention(em, node)
                else:
                    new, replaced = _convert_weighted(em, node), node
            for key in (LAYER_KEY, QUANT_KEY, "lowbit.attention", "nn_module_stack"):
                if key in node.meta:
                    new.meta[key] = node.meta[key]
            replaced.replace_all_uses_with(new)
            erase_unused(replaced)
            modified = True
        if modified:
            _drop_unused_parameters(gm)
            gm.recompile()
        return PassResult(gm, modified)
