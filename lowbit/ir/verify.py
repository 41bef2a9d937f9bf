"""The IR verifier, run at a pipeline's entry and exit and after every pass.

It checks what every pass promises (see lowbit/passes/README.md) and fails with a message that
names the node, its layer and the stage (the pass that ran last), so a broken rewrite is caught
where it happened rather than as a shape error three passes later.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.schema import SelectTimestep, schema_class
from lowbit.ir.annotations import (
    ATTENTION_KEY, CREATED_BY_KEY, LAYER_KEY, OUTLIER_KEY, QUANT_KEY, AttentionInfo, LayerInfo, OutlierDim, QuantAnnotation,
)

__all__ = ["IRError", "verify"]


class IRError(RuntimeError):
    """The graph breaks an IR invariant."""


def _fail(stage: str, node: torch.fx.Node, problem: str) -> None:
    layer = node.meta.get(LAYER_KEY)
    where = f"node '{node.name}'" + (f" (layer {layer.path})" if layer else "")
    raise IRError(f"IR check after {stage}: {where}: {problem}")


def _is_lowbit_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "lowbit"


def _check_arguments(stage: str, node: torch.fx.Node) -> None:
    """lowbit ops carry their arguments by name, exactly their schema's fields: nothing can read
    them by position, and a field added to a schema cannot be silently missing from a node."""
    schema = schema_class(node)
    if schema is None:
        _fail(stage, node, f"{node.target} has no schema in lowbit.ir.schema")
    fields = [f.name for f in dataclasses.fields(schema)]
    if node.args or sorted(node.kwargs) != sorted(fields):
        _fail(stage, node, f"{node.target} must be called with exactly its schema's fields by keyword "
                           f"({', '.join(fields)}); emit it with {schema.__name__}(...).emit(graph)")


def verify(gm: torch.fx.GraphModule, stage: str) -> None:
    """Raise :class:`IRError` if any invariant is broken."""
    try:
        gm.graph.lint()
    except Exception as err:  # fx's lint raises plain RuntimeError/AssertionError
        raise IRError(f"IR check after {stage}: graph is malformed: {err}") from err
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                fetch_attr(gm, node.target)
            except AttributeError:
                _fail(stage, node, f"get_attr target '{node.target}' does not exist in the module")
        for key, cls in ((LAYER_KEY, LayerInfo), (QUANT_KEY, QuantAnnotation), (ATTENTION_KEY, AttentionInfo)):
            if key in node.meta and not isinstance(node.meta[key], cls):
                _fail(stage, node, f"meta['{key}'] must be a {cls.__name__}, found {type(node.meta[key]).__name__}")
        outliers = node.meta.get(OUTLIER_KEY, {})
        if not isinstance(outliers, dict) or not all(isinstance(v, OutlierDim) for v in outliers.values()):
            _fail(stage, node, f"meta['{OUTLIER_KEY}'] must map operand names to OutlierDim")
        if QUANT_KEY in node.meta and LAYER_KEY not in node.meta:
            _fail(stage, node, "a quantization annotation without a layer annotation")
        if _is_lowbit_op(node):
            _check_arguments(stage, node)
            if CREATED_BY_KEY not in node.meta:
                _fail(stage, node, f"lowbit op {node.target} carries no '{CREATED_BY_KEY}' stamp")
            if node.target != SelectTimestep.overload() and LAYER_KEY not in node.meta:
                _fail(stage, node, f"lowbit op {node.target} carries no layer annotation")
