"""The per-layer report: what each layer was quantized to, and what it cost in accuracy.

The error of a layer is measured where it happens: an fx Interpreter runs the quantized graph
on calibration samples and, at each quantized op, also computes the full-precision op on the
same input (the original weights, unquantized activations), accumulating the relative L2 error
and the SQNR of the layer's output. That isolates each layer's own error from the error it
inherits from the layers before it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.fx
import torch.nn.functional as F

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.attention_statistics import candidate_name
from lowbit.ir.capture import normalize_inputs
from lowbit.ir.ops import attention_probs
from lowbit.ir.params import target_name
from lowbit.ir.schema import FakeQuant, QuantizedAttention, QuantizedConv2d, QuantizedLinear, schema_class, schema_of
from lowbit.core.quantized_model import QuantizedModel

__all__ = ["LayerRow", "format_table", "layer_report", "write_csv", "write_json"]

_INPUT_OPERANDS = ("input", "query", "key", "value", "probs")


@dataclass(frozen=True)
class LayerRow:
    layer: str
    op: str
    weight_bits: float | None
    activation_bits: float | None
    granularity: str
    range_min: float | None
    range_max: float | None
    timesteps: int
    rel_error: float | None
    sqnr_db: float | None
    attention: str  # the probabilities' quantizer ("log2+start": log2 with the start column exact), "-" elsewhere
    set_by: str  # the recipe's [layers."pattern"] tables that set this layer, else "recipe" or "keep_io_layers"


class _ErrorProbe(torch.fx.Interpreter):
    """Runs the quantized graph and compares every quantized op with its full-precision twin."""

    def __init__(self, qmodel: QuantizedModel):
        super().__init__(qmodel.graph_module, garbage_collect_values=False)  # fake_quant inputs are read later
        self.original = qmodel.original
        self.err2: dict[str, float] = {}
        self.ref2: dict[str, float] = {}

    def _fp_input(self, node: torch.fx.Node):
        """The value before its fake quantizer, if it has one."""
        if isinstance(op := schema_of(node), FakeQuant):
            return self.env[op.x]
        return self.env[node]

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        schema = schema_class(n)
        if schema not in (QuantizedLinear, QuantizedConv2d, QuantizedAttention):
            return out
        path = n.meta[LAYER_KEY].path
        op = schema.of(n)
        value = lambda a: self.env[a] if isinstance(a, torch.fx.Node) else a  # noqa: E731
        if isinstance(op, QuantizedAttention):
            q, k, v = (self._fp_input(a) for a in (op.q, op.k, op.v))
            fp = torch.matmul(attention_probs(q, k, value(op.attn_mask), op.scale).to(v.dtype), v)
        else:
            weight = self.original.get_submodule(path).weight
            if isinstance(op, QuantizedLinear):
                fp = F.linear(value(op.x), weight, value(op.bias))
            else:
                fp = F.conv2d(value(op.x), weight, value(op.bias), op.stride, op.padding, op.dilation, op.groups)
        self.err2[path] = self.err2.get(path, 0.0) + float((out.float() - fp.float()).pow(2).sum())
        self.ref2[path] = self.ref2.get(path, 0.0) + float(fp.float().pow(2).sum())
        return out


def layer_report(qmodel: QuantizedModel, calibration: Iterable | None = None, max_samples: int = 8) -> list[LayerRow]:
    """One row per quantized layer; errors need ``calibration`` samples (the first ``max_samples``)."""
    probe = _ErrorProbe(qmodel)
    codegen = qmodel.graph_module.graph._codegen
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calibration or []):
            if i >= max_samples:
                break
            inputs = normalize_inputs(qmodel.original, args, kwargs, qmodel.step_arg)
            probe.run(*codegen.process_inputs((), inputs))
    rows, seen = [], set()
    precision = qmodel.recipe.precision
    for node in qmodel.graph_module.graph.nodes:
        if LAYER_KEY not in node.meta or node.op != "call_function" or schema_class(node) is FakeQuant:
            continue
        info, annotation = node.meta[LAYER_KEY], node.meta.get(QUANT_KEY)
        if info.path in seen or (annotation is None and info.kind == "attention" and not precision.quantize_attention):
            continue
        seen.add(info.path)
        set_by = precision.resolve(info.path).set_by
        source = ", ".join(f'layers."{p}"' for p in set_by) or ("recipe" if annotation else "keep_io_layers")
        if annotation is None:
            rows.append(LayerRow(info.path, info.kind, None, None, "float", None, None, 0, None, None, "-", source))
            continue
        operands = annotation.operands()
        act = next((operands[o] for o in _INPUT_OPERANDS if o in operands), None)
        ranges = [qmodel.params[t] for o in _INPUT_OPERANDS if (t := target_name(info.path, o)) in qmodel.params]
        lo = hi = None
        if ranges:
            low, high = ranges[0].representable_range()
            lo, hi = float(low.min()), float(high.max())
        rel = math.sqrt(probe.err2[info.path] / probe.ref2[info.path]) if probe.ref2.get(info.path) else None
        rows.append(LayerRow(
            layer=info.path,
            op=info.kind,
            weight_bits=annotation.weight.bits if annotation.weight else None,
            activation_bits=act.bits if act else None,
            granularity="/".join(dict.fromkeys(s.granularity for s in operands.values())),
            range_min=lo,
            range_max=hi,
            timesteps=len(ranges[0].timesteps) if ranges and ranges[0].timesteps is not None else 1,
            rel_error=rel,
            sqnr_db=-20 * math.log10(rel) if rel else None,
            attention=_probs_quantizer(node.graph, info.path) if info.kind == "attention" else "-",
            set_by=source,
        ))
    return rows


def _probs_quantizer(graph: torch.fx.Graph, layer: str) -> str:
    """How an attention layer's probabilities are quantized, read from its quantized op."""
    op = next((QuantizedAttention.of(n) for n in graph.nodes
               if schema_class(n) is QuantizedAttention and n.meta[LAYER_KEY].path == layer), None)
    return "-" if op is None else candidate_name(op.probs_scheme, op.start_token >= 0)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[LayerRow]) -> str:
    """A fixed-width table for the terminal."""
    header = ["layer", "op", "W", "A", "granularity", "range", "T", "rel.err", "SQNR dB", "probs", "set by"]
    body = [[r.layer, r.op, _fmt(r.weight_bits), _fmt(r.activation_bits), r.granularity,
             f"[{_fmt(r.range_min)}, {_fmt(r.range_max)}]", str(r.timesteps), _fmt(r.rel_error), _fmt(r.sqnr_db),
             r.attention, r.set_by]
            for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def write_csv(rows: list[LayerRow], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(LayerRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def write_json(rows: list[LayerRow], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=1))
