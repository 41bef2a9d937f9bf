"""Insert timestep-aware observers on every activation that a QuantAnnotation quantizes.

Diffusion activations change with the timestep (TFMQ-DM, DGQ eq. 7), so each observer reads
the graph's timestep input and files its streaming statistics under (target, timestep) in the
context's ObservationStore: per-channel and per-token min/max plus per-channel moments, whose
memory grows with channels + tokens, never with the number of calibration samples. Observers
are side-effect nodes (no users), so the observed graph computes exactly what it did before.
They hold no store: calibration runs the graph inside ``lowbit.ir.observers.observing(gm,
ctx.observations)``, which hands them the context's store for that time only. Probabilities whose
scheme is still "auto" also get an observer of what each candidate quantizer would do to the
attention's output (``lowbit.ir.attention_statistics``), for choose_attention_scheme.
"""

from __future__ import annotations

import torch
import torch.fx

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.attention import parse_canonical_attention
from lowbit.ir.attention_schemes import errors_target
from lowbit.ir.operands import activation_operands
from lowbit.ir.params import target_name
from lowbit.ir.observers import AttentionErrorObserver, Observer, attach_observer, step_input
from lowbit.passes.base import Pass, PassContext, PassResult

__all__ = ["InsertObservers"]


class InsertObservers(Pass):
    name = "insert_observers"
    phase = "observe"
    requires = ("annotate_quantization",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        step = step_input(gm, ctx.step_arg)
        count = 0

        def observe(observer: Observer, value: torch.fx.Node, consumer: torch.fx.Node, *companions: torch.fx.Node) -> None:
            nonlocal count
            attach_observer(gm, f"obs{count}", observer, (value, step, *companions), before=consumer)  # after the operand
            count += 1

        for node in list(gm.graph.nodes):
            annotation = node.meta.get(QUANT_KEY)
            if annotation is None:
                continue
            info = node.meta[LAYER_KEY]
            attention = parse_canonical_attention(node) if info.kind == "attention" else None
            consumer = attention.output if attention is not None else node
            for operand, (value, layout) in activation_operands(node).items():
                spec = getattr(annotation, operand)
                if spec is not None and spec.scheme == "auto":
                    observe(AttentionErrorObserver(errors_target(info.path), value.name, annotation.start_token, spec.qmax + 1),
                            value, consumer, attention.v)
                if spec is None or spec.mode == "dynamic":  # nothing to calibrate: its range comes from itself
                    continue
                observe(Observer(target_name(info.path, operand), value.name, layout), value, consumer)
        if count:
            gm.recompile()
        return PassResult(gm, modified=count > 0)
