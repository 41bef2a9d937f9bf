"""Graph preparation: specialize a quantized graph to one timestep and one batch size.

The QNN HTP compiles static graphs: static shapes and static quantization scales. lowbit's
graph picks per-timestep scales at run time (``lowbit.select_timestep``) and computes the
timestep embedding from the timestep input. Running the graph once on concrete example inputs
gives every node's value; every node that does not depend on a runtime input (the image latents,
the text states, the mask) — the timestep embedding MLP, the AdaLN-single modulation, every
``select_timestep`` row — is then a constant of the specialized graph, folded with lowbit's own
reference ops, so it is exactly what the eager module computes at that timestep. The emitted
ONNX graph has no timestep input; one graph is exported per timestep (see ``export.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from lowbit.ir.annotations import LAYER_KEY
from lowbit.ir.capture import module_path

__all__ = ["SpecializedGraph", "flat_inputs", "layer_of", "specialize"]


def layer_of(node: torch.fx.Node) -> str:
    """The lowbit layer a node belongs to: its annotated layer path, else its module path."""
    info = node.meta.get(LAYER_KEY)
    if info is not None:
        return info.path
    return module_path(node) or "<model>"


@dataclass
class SpecializedGraph:
    """A quantized fx graph run once on concrete inputs.

    ``values`` holds every node's concrete output; ``runtime`` the nodes that depend on an input
    other than the timestep (everything else is a constant of this specialization); ``inputs``
    the runtime placeholders in call order, with their example values.
    """

    graph_module: torch.fx.GraphModule
    values: dict[torch.fx.Node, Any]
    runtime: set[torch.fx.Node]
    inputs: dict[str, torch.Tensor]
    timestep: float | None

    def is_constant(self, arg: Any) -> bool:
        return not self.is_runtime(arg)

    def is_runtime(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg in self.runtime

    def value(self, arg: Any) -> Any:
        """The concrete value of an argument (a node's output, or the literal itself)."""
        return pytree.tree_map(lambda a: self.values[a] if isinstance(a, torch.fx.Node) else a, arg)

    @property
    def outputs(self) -> list[torch.fx.Node]:
        out = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        return [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, torch.fx.Node)]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def flat_inputs(gm: torch.fx.GraphModule, inputs: dict[str, Any]) -> dict[str, Any]:
    """The graph's placeholders by name, from normalized keyword inputs (nested inputs flattened)."""
    flat = fx_pytree.tree_flatten_spec(((), inputs), gm.graph._codegen.pytree_info.in_spec)
    return {n.name: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), flat)}


def specialize(gm: torch.fx.GraphModule, inputs: dict[str, Any], step_arg: str | None,
               constant_inputs: frozenset[str] = frozenset()) -> SpecializedGraph:
    """Run ``gm`` on ``inputs`` (normalized keyword inputs) and split runtime from constant nodes.

    Every timestep in the batch must be the same: a specialized graph serves one timestep.
    ``constant_inputs`` (placeholder names) are folded like the timestep: inputs without a batch
    dimension, such as FLUX's position ids, are fixed by the image size the graph is built for.
    """
    timestep = None
    if step_arg is not None and step_arg in inputs:
        t = torch.as_tensor(inputs[step_arg]).float().reshape(-1)
        if not torch.all(t == t[0]):
            raise ValueError(f"a specialized graph serves one timestep; the batch has timesteps {t.tolist()}")
        timestep = float(t[0])
    flat = flat_inputs(gm, inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*flat.values())
    runtime: set[torch.fx.Node] = set()
    runtime_inputs: dict[str, torch.Tensor] = {}
    for node in placeholders:
        value = flat[node.name]
        if (node.name != step_arg and node.name not in constant_inputs and isinstance(value, torch.Tensor)
                and value.numel() > 0):  # an empty input (VAR's cache at the first scale) carries nothing
            runtime.add(node)
            runtime_inputs[node.name] = value
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            deps = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
            carries_tensor = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(recorder.values.get(node)))
            if carries_tensor and any(d in runtime for d in deps):  # sizes of runtime tensors are constants here
                runtime.add(node)
    return SpecializedGraph(gm, recorder.values, runtime, runtime_inputs, timestep)
