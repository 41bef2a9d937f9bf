"""AdaRound weight rounding with BRECQ block-wise reconstruction (DGQ §4.1, Nagel et al. 2020, Li et al. 2021).

Rounding every weight to its nearest grid point is not what minimizes a block's output error.
AdaRound learns, per weight, whether to round down or up: W̃ = s · clamp(⌊W/s⌋ + h(V), qmin, qmax)
with the rectified sigmoid h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1 (AdaRound eq.
23), initialized so that W̃ = W, and minimizes

    ‖f(X; W̃) − f(X; W)‖² + λ Σ (1 − |2h(V) − 1|^β)      (AdaRound eq. 25, BRECQ eq. 10)

over the calibration inputs X of each unit f, with β annealed from 20 to 2 after a warm-up of
20% of the iterations without the regularizer, λ = 0.01, Adam at lr 1e-3 (BRECQ's settings).
BRECQ's units are the blocks that ``lowbit.ir.graph_view.find_blocks`` finds — transformer and
ResNet blocks, reconstructed as a whole so that the rounding of one layer can compensate
another's — plus every quantized layer outside them, alone. The unit's inputs and targets come
from the full-precision graph on calibration samples that ``lowbit.quantize`` keeps for this
pass (``PassContext.samples``); activations stay in full precision during reconstruction, as in
BRECQ's weight stage. The scales stay those of ``choose_quant_params``; the learned rounding
replaces the integer weights in ``ctx.params``, which convert_to_quantized_ops and
``lowbit.load`` read unchanged — unless, on the kept samples, the unit's output error with the
learned (hard) rounding is not lower than with rounding to nearest, which then stays.
``losses`` records both errors per unit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch
import torch.fx
from tqdm.auto import tqdm

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.graph_view import find_blocks
from lowbit.ir.observers import is_observer
from lowbit.ir.params import OperandParams, target_name
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["ReconstructWeights", "Unit", "reconstruction_units"]

_ZETA, _GAMMA = 1.1, -0.1
_BETA_START, _BETA_END, _WARMUP = 20.0, 2.0, 0.2
_LAMBDA, _LR = 0.01, 1e-3
_WEIGHTED = ("linear", "conv2d")


@dataclasses.dataclass(frozen=True)
class Unit:
    """Nodes reconstructed together, in graph order, and the quantized weighted layers among them."""

    path: str
    nodes: tuple[torch.fx.Node, ...]
    layers: tuple[torch.fx.Node, ...]


def _quantized_weighted(node: torch.fx.Node) -> bool:
    annotation = node.meta.get(QUANT_KEY)
    return annotation is not None and annotation.weight is not None and node.meta[LAYER_KEY].kind in _WEIGHTED


def _close(gm: torch.fx.GraphModule, members: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Members plus every computing node on a path between two members (e.g. the matmuls that
    canonicalize_attention inserted without a module stack), so the unit is a closed region."""
    after: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node in members or any(a in members or a in after for a in node.all_input_nodes):
            after.add(node)
    before: set[torch.fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node in members or any(u in members or u in before for u in node.users):
            before.add(node)
    return {n for n in (after & before) | members if n.op == "call_function"}


def reconstruction_units(gm: torch.fx.GraphModule) -> list[Unit]:
    """BRECQ's units: transformer and ResNet blocks, then each quantized layer outside them."""
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units, covered = [], set()
    for block in find_blocks(gm):
        if block.kind == "attention":
            continue  # inside a transformer block, which is reconstructed whole
        nodes = _close(gm, {by_name[name] for name in block.nodes if name in by_name})
        layers = [n for n in nodes if _quantized_weighted(n)]
        covered |= set(layers)
        if layers:
            units.append(Unit(block.path, tuple(sorted(nodes, key=order.get)), tuple(sorted(layers, key=order.get))))
    for node in gm.graph.nodes:
        if _quantized_weighted(node) and node not in covered:
            units.append(Unit(node.meta[LAYER_KEY].path, (node,), (node,)))
    return sorted(units, key=lambda u: order[u.nodes[0]])


class _Subgraph:
    """A unit as its own GraphModule: f(*external inputs, *weights) -> outputs used outside the unit."""

    def __init__(self, gm: torch.fx.GraphModule, unit: Unit):
        inside = set(unit.nodes)
        weights = {layer.args[1]: i for i, layer in enumerate(unit.layers)}
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.inputs: list[torch.fx.Node] = []
        self.slots: list[tuple[str, int]] = []  # the placeholders in order: ("input", i) or ("weight", j)

        def remap(a: torch.fx.Node) -> torch.fx.Node:
            if a not in env:
                if a in weights:
                    env[a] = graph.placeholder(f"weight_{weights[a]}")
                    self.slots.append(("weight", weights[a]))
                elif a.op == "get_attr":
                    env[a] = graph.get_attr(a.target)
                else:
                    env[a] = graph.placeholder(f"input_{len(self.inputs)}")
                    self.slots.append(("input", len(self.inputs)))
                    self.inputs.append(a)
            return env[a]

        for node in unit.nodes:
            env[node] = graph.node_copy(node, remap)
        self.outputs = [n for n in unit.nodes if any(u not in inside and not is_observer(u) for u in n.users)]
        graph.output(tuple(env[n] for n in self.outputs))
        self.module = torch.fx.GraphModule(gm, graph)

    def __call__(self, inputs: list, weights: list[torch.Tensor]) -> tuple:
        args = [inputs[i] if kind == "input" else weights[i] for kind, i in self.slots]
        return self.module(*args)


class _Recorder(torch.fx.Interpreter):
    """Runs the full-precision graph (observers skipped) and keeps the values of ``wanted`` nodes."""

    class _Done(Exception):
        pass

    def __init__(self, gm: torch.fx.GraphModule, wanted: Iterable[torch.fx.Node]):
        super().__init__(gm)
        self.wanted = set(wanted)
        self.values: dict[torch.fx.Node, object] = {}

    def run_node(self, n: torch.fx.Node):
        if is_observer(n):
            return None
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out.detach() if isinstance(out, torch.Tensor) else out
            if len(self.values) == len(self.wanted):
                raise self._Done
        return out

    def record(self, inputs: dict) -> dict[torch.fx.Node, object]:
        self.values = {}
        try:
            self.run(*self.graph._codegen.process_inputs((), inputs))
        except self._Done:
            pass
        return self.values


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


class _Rounding:
    """AdaRound's learned rounding of one layer's weight onto its fixed per-channel grid."""

    def __init__(self, weight: torch.Tensor, params: OperandParams):
        self.params = params
        self.scale = params.scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        scaled = weight.detach().float() / self.scale
        self.floor = torch.floor(scaled)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)  # h(V) = rest makes W̃ = W at the start
        self.v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0))

    def soft(self) -> torch.Tensor:
        spec = self.params.spec
        return self.scale * torch.clamp(self.floor + _rectified_sigmoid(self.v), spec.qmin, spec.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * _rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()

    def hard(self) -> OperandParams:
        spec = self.params.spec
        q = torch.clamp(self.floor + (self.v.detach() >= 0).float(), spec.qmin, spec.qmax)  # h(V) >= 0.5 iff V >= 0
        return dataclasses.replace(self.params, qvalues=OperandParams.weight_storage(spec, q))


def _output_error(outputs: tuple, targets: list) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over each output's features, averaged over the batch."""
    terms = [(o - t).pow(2).reshape(o.shape[0], -1).sum(1).mean()
             for o, t in zip(outputs, targets) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]
    return torch.stack(terms).sum()


class ReconstructWeights(Pass):
    name = "reconstruct_weights"
    phase = "decide"
    requires = ("choose_quant_params",)

    def __init__(self, iterations: int = 200, samples: int = 8, seed: int = 0):
        if iterations < 1 or samples < 1:
            raise ValueError(f"iterations and samples must be at least 1; got {iterations}, {samples}")
        self.iterations, self.kept_samples, self.seed = iterations, samples, seed
        self.losses: dict[str, tuple[float, float]] = {}  # unit -> (nearest, kept) output error on the kept samples

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.samples:
            raise PassError(f"{self.name} needs calibration samples in the pass context (lowbit.quantize keeps "
                            f"{self.kept_samples} of them for this pass)")
        rng = np.random.default_rng(self.seed)
        units = reconstruction_units(gm)
        # disable=None: a bar on a terminal, silent in logs and tests
        bar = tqdm(units, desc=f"{self.name} ({self.iterations} iterations per block)", disable=None, leave=False)
        learned = [self._reconstruct(gm, unit, ctx, rng) for unit in bar]
        # only the integer weights in ctx.params change; the graph is converted later
        return PassResult(gm, modified=any(learned))

    def _reconstruct(self, gm: torch.fx.GraphModule, unit: Unit, ctx: PassContext, rng: np.random.Generator) -> bool:
        """Learn the rounding of one unit's weights; True if it beat nearest rounding and replaced it."""
        sub = _Subgraph(gm, unit)
        recorder = _Recorder(gm, sub.inputs + sub.outputs)
        with torch.no_grad():
            recorded = [recorder.record(inputs) for inputs in ctx.samples]
        data = [([r[n] for n in sub.inputs], [r[n] for n in sub.outputs]) for r in recorded]
        targets = [target_name(layer.meta[LAYER_KEY].path, "weight") for layer in unit.layers]
        roundings = [_Rounding(fetch_attr(gm, layer.args[1].target), ctx.params[t]) for layer, t in zip(unit.layers, targets)]
        optimizer = torch.optim.Adam([r.v for r in roundings], lr=_LR)
        warmup = int(_WARMUP * self.iterations)
        for step in range(self.iterations):
            inputs, outputs = data[rng.integers(len(data))]
            loss = _output_error(sub(inputs, [r.soft() for r in roundings]), outputs)
            if step >= warmup:
                progress = (step - warmup) / max(1, self.iterations - warmup)
                beta = _BETA_END + (_BETA_START - _BETA_END) * (1.0 - progress)
                loss = loss + _LAMBDA * sum(r.regularizer(beta) for r in roundings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        learned = [r.hard() for r in roundings]
        nearest = [ctx.params[t] for t in targets]
        with torch.no_grad():
            def error(params: list[OperandParams]) -> float:
                weights = [p.scale.reshape(r.scale.shape) * p.codes.float() for p, r in zip(params, roundings)]
                return float(sum(_output_error(sub(i, weights), o) for i, o in data) / len(data))
            before, after = error(nearest), error(learned)
        self.losses[unit.path] = (before, min(before, after))
        if after < before:  # the hard rounding can lose to nearest where nearest was already good: keep the better
            for t, p in zip(targets, learned):
                ctx.params[t] = p
        return after < before
