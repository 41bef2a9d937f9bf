"""Insert trainable fake quantizers: the first step of quantization-aware training (FraQAT, LSQ).

After calibration and ``choose_quant_params``, every quantized layer's weight is routed through a
:class:`~lowbit.ir.fake_quantizers.WeightFakeQuantizer` holding a trainable offset Δ (zero at
first), so the layer computes with Q(W + Δ) at the quantizer's bit-width; its input activation,
and an attention's Q, K, V and probabilities, through an
:class:`~lowbit.ir.fake_quantizers.OperandFakeQuantizer` with the calibrated parameters. The
model's own parameters are never written (the captured graph shares them with the user's model):
they are frozen in the graph, training changes Δ only, and with the quantizers disabled the graph
is the full-precision teacher.
Observers are removed, since their statistics are already in the context and a training loop
must not run them. ``fold_fake_quantizers`` undoes this after training.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.attention import parse_canonical_attention
from lowbit.ir.fake_quantizers import FAKE_QUANTIZERS, OperandFakeQuantizer, WeightFakeQuantizer
from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.observers import remove_observers
from lowbit.ir.operands import activation_operands
from lowbit.ir.params import target_name
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["InsertFakeQuantizers"]


def _attention_region(probs: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes of one canonical attention between its operands and its output."""
    ops = parse_canonical_attention(probs)
    stops, region, todo = {ops.q, ops.k, ops.v, ops.mask}, set(), [ops.output]
    while todo:
        node = todo.pop()
        if node in region or node in stops or node.op != "call_function":
            continue
        region.add(node)
        todo.extend(node.all_input_nodes)
    return region


def _freeze(gm: torch.fx.GraphModule) -> None:
    """The graph's parameters as new frozen Parameters on the same storage: training computes no gradient
    for them, and the user's model, which owns the originals, keeps its flags."""
    for name, p in list(gm.named_parameters()):
        if p.requires_grad:
            owner, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, torch.nn.Parameter(p.detach(), requires_grad=False))


class InsertFakeQuantizers(Pass):
    name = "insert_fake_quantizers"
    phase = "decide"
    requires = ("choose_quant_params",)
    before = ("convert_to_quantized_ops",)

    def __init__(self, lsq: bool = False):
        self.lsq = lsq

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        observers = remove_observers(gm)
        if hasattr(gm, FAKE_QUANTIZERS):
            raise PassError("the graph already holds fake quantizers; fold them before inserting new ones")
        _freeze(gm)
        gm.add_submodule(FAKE_QUANTIZERS, torch.nn.Module())
        holder = getattr(gm, FAKE_QUANTIZERS)
        timestep = next((n for n in graph.nodes if n.op == "placeholder" and n.name == ctx.step_arg), None)

        order = {n: i for i, n in enumerate(graph.nodes)}

        def insert(module: torch.nn.Module, value: torch.fx.Node, readers: list[torch.fx.Node], per_step: bool) -> None:
            name = f"fq{len(holder._modules)}"
            holder.add_module(name, module)
            first = min(readers, key=order.get)
            with graph.inserting_before(first):  # after the value and the step input
                fq = graph.call_module(f"{FAKE_QUANTIZERS}.{name}", (value, timestep) if per_step else (value,))
            fq.meta["val"] = value.meta.get("val")
            for reader in readers:
                reader.replace_input_with(value, fq)

        for node in list(graph.nodes):
            annotation = node.meta.get(QUANT_KEY)
            if annotation is None or node.op != "call_function":
                continue
            path = node.meta[LAYER_KEY].path
            attention = node.meta[LAYER_KEY].kind == "attention"
            region = _attention_region(node) if attention else {node}
            if annotation.weight is not None:
                weight = node.args[1]
                quantizer = WeightFakeQuantizer(target_name(path, "weight"), fetch_attr(gm, weight.target),
                                                annotation.weight.bits, self.lsq)
                insert(quantizer, weight, [node], per_step=False)
            for operand, (value, _) in activation_operands(node).items():
                spec = getattr(annotation, operand)
                if spec is None:
                    continue
                target = target_name(path, operand)
                params = None if spec.mode == "dynamic" else ctx.params.get(target)
                if spec.mode != "dynamic" and params is None:
                    raise PassError(f"no quantization parameters for {target}; run choose_quant_params first")
                if params is not None and params.timesteps is not None and timestep is None:
                    raise PassError(f"{target} has per-step parameters but the graph has no '{ctx.step_arg}' input")
                start = annotation.start_token if operand == "probs" else None
                readers = [u for u in value.users if u in region and u.op == "call_function"]
                insert(OperandFakeQuantizer(target, spec, params, start), value, readers,
                       per_step=params is not None and params.timesteps is not None)
        gm.recompile()
        return PassResult(gm, modified=bool(observers or holder._modules))
