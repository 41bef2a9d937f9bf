"""Before/Expected structural tests, one per registered pass (lowbit issue 11).

In the shape of TVM's pass tests: each test builds a tiny Before graph (a hand-written module
captured with ``capture`` and brought to the pass's preconditions by the passes it requires), runs
the pass under test through a ``Pipeline`` (so the IR is verified and the pass's record is kept),
writes down by hand the graph it Expects with ``torch.fx.Graph`` calls and the lowbit schemas, and
compares the two with :func:`assert_same_structure`: node ops and targets in order, which node
feeds which argument (by keyword for lowbit ops), the lowbit meta annotations, the values behind
``get_attr`` nodes, and the observers' targets. Node names never enter the comparison: every node
is named by its position. Each test also checks what the pass does to the context, and one number
against eager PyTorch where that makes sense.

``test_every_registered_pass_has_a_structural_test`` fails when a pass is registered in
``lowbit.passes.PASSES`` without a test here marked with ``@structural(name)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lowbit.ir.annotations import (
    ATTENTION_KEY, CREATED_BY_KEY, LAYER_KEY, OUTLIER_KEY, QUANT_KEY, AttentionInfo, LayerInfo, OutlierDim,
    QuantAnnotation, QuantSpec,
)
from lowbit.ir.capture import capture
from lowbit.ir.fake_quantizers import OperandFakeQuantizer, WeightFakeQuantizer
from lowbit.ir.graph_edit import fetch_attr
from lowbit.ir.attention_statistics import CANDIDATES
from lowbit.ir.observers import AttentionMassObserver, CFGDifferenceObserver, AttentionErrorObserver, Observer, observing
from lowbit.ir.params import OperandParams
from lowbit.ir.precision import LayerOverride, Precision
from lowbit.ir.schema import FakeQuant, OpSchema, QuantizedAttention, QuantizedLinear, SelectTimestep
from lowbit.passes import PASSES, PassContext, PassError, Pipeline, create
from lowbit.passes.pipeline import HISTORY_KEY, PassRecord

aten = torch.ops.aten

META_KEYS = (LAYER_KEY, QUANT_KEY, ATTENTION_KEY, OUTLIER_KEY, CREATED_BY_KEY)
STEPS = (900.0, 100.0)  # calibration timesteps; per-step parameters list them sorted: (100, 900)

W8 = QuantSpec(8, granularity="channel", axis=0, symmetric=True)
W4 = QuantSpec(4, granularity="channel", axis=0, symmetric=True)
A8 = QuantSpec(8, mode="per_step")  # activations and probabilities: asymmetric, per tensor, per step


# ---------------------------------------------------------------------------------------------
# The comparison


def _render(value: Any, index: dict[torch.fx.Node, int]) -> str:
    """An argument with every node replaced by its position (``%3``)."""
    if isinstance(value, torch.fx.Node):
        return f"%{index[value]}"
    if isinstance(value, tuple):
        return "(" + "".join(_render(v, index) + ", " for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, index) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_render(v, index)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def _describe_module(gm: torch.fx.GraphModule, node: torch.fx.Node, by_name: dict[str, int]) -> str:
    """An observer by what it files and whose value it watches (by position), a fake quantizer by its target
    and bit-width; other modules by target only."""
    module = fetch_attr(gm, node.target)
    if isinstance(module, WeightFakeQuantizer):
        return f" [WeightFakeQuantizer target={module.target!r} bits={float(module.bits):g} final={module.final:g}]"
    if isinstance(module, OperandFakeQuantizer):
        return f" [OperandFakeQuantizer target={module.target!r} spec={module.spec!r}]"
    if not isinstance(module, Observer):
        return ""
    watched = f"%{by_name[module.node]}" if module.node in by_name else f"<unknown node {module.node!r}>"
    return f" [Observer target={module.target!r} node={watched} layout={module.layout!r}]"


def _lines(gm: torch.fx.GraphModule) -> list[str]:
    """One line per node, in graph order, that names nodes by position only."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: i for n, i in index.items()}
    lines = []
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            lines.append(f"%{i} = placeholder {n.target}")
        elif n.op == "get_attr":
            lines.append(f"%{i} = get_attr {n.target}")
        elif n.op == "call_module":
            lines.append(f"%{i} = call_module {n.target}{_render(n.args, index)}{_describe_module(gm, n, by_name)}")
        elif n.op == "output":
            lines.append(f"output{_render(n.args, index)}")
        else:  # call_function (lowbit ops: keyword arguments, rendered sorted by name)
            lines.append(f"%{i} = {n.op} {n.target}{_render(n.args, index)} {_render(dict(n.kwargs), index)}")
    return lines


def _approx_equal(a: Any, b: Any) -> bool:
    """Equality, with floats (spreads, scales) equal to a relative 1e-5."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_approx_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_structure(actual_gm: torch.fx.GraphModule, expected_gm: torch.fx.GraphModule, meta_keys=META_KEYS) -> None:
    """Fail, with a diff, unless the two graphs are the same up to node names.

    Compared per node, in order: op, target and arguments (nodes by position, lowbit ops' keyword
    arguments by name), the annotations under ``meta_keys`` (absent on one side means absent on
    the other), the tensor behind every ``get_attr`` (equal dtype, shape and values), and an
    observer's target, layout and watched node. Every call_function of ``actual_gm`` must carry
    a fake ``meta["val"]`` (README: new nodes carry one).
    """
    got, want = _lines(actual_gm), _lines(expected_gm)
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "expected", "actual", lineterm="", n=2))
        raise AssertionError(f"graph structure differs (nodes named by position):\n{diff}")
    problems = []
    for line, a, e in zip(got, actual_gm.graph.nodes, expected_gm.graph.nodes):
        for key in meta_keys:
            if not _approx_equal(a.meta.get(key), e.meta.get(key)):
                problems.append(f"{line}\n    meta[{key!r}] is   {a.meta.get(key)!r}\n    expected       {e.meta.get(key)!r}")
        if a.op == "get_attr":
            got_t, want_t = fetch_attr(actual_gm, a.target), fetch_attr(expected_gm, e.target)
            same = (isinstance(got_t, torch.Tensor) and got_t.dtype == want_t.dtype and got_t.shape == want_t.shape
                    and torch.equal(got_t, want_t))
            if not same:
                problems.append(f"{line}\n    holds    {got_t!r}\n    expected {want_t!r}")
        if a.op == "call_function" and "val" not in a.meta:
            problems.append(f"{line}\n    has no fake meta['val']")
    if problems:
        raise AssertionError("graphs agree in structure but not in annotations or values:\n" + "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Writing Expected graphs by hand


class ExpectedGraph:
    """``torch.fx.Graph`` calls with the values behind get_attr / call_module targets and the
    annotations of each node; ``created_by`` stamps the nodes a pass inserts, as the pipeline does."""

    def __init__(self):
        self.graph = torch.fx.Graph()
        self.values: dict[str, Any] = {}
        self._stamp: str | None = None

    @contextmanager
    def created_by(self, pass_name: str):
        self._stamp = pass_name
        try:
            yield
        finally:
            self._stamp = None

    def _made(self, node: torch.fx.Node, layer=None, quant=None, attention=None, outliers=None) -> torch.fx.Node:
        for key, value in ((LAYER_KEY, layer), (QUANT_KEY, quant), (ATTENTION_KEY, attention), (OUTLIER_KEY, outliers),
                           (CREATED_BY_KEY, self._stamp)):
            if value is not None:
                node.meta[key] = value
        return node

    def input(self, name: str) -> torch.fx.Node:
        return self.graph.placeholder(name)

    def attr(self, target: str, value: torch.Tensor) -> torch.fx.Node:
        self.values[target] = value
        return self._made(self.graph.get_attr(target))

    def module(self, target: str, module: nn.Module, *args) -> torch.fx.Node:
        self.values[target] = module
        return self._made(self.graph.call_module(target, args))

    def call(self, target, *args, **meta) -> torch.fx.Node:
        return self._made(self.graph.call_function(target, args), **meta)

    def op(self, schema: OpSchema, **meta) -> torch.fx.Node:
        return self._made(schema.emit(self.graph), **meta)

    def output(self, *values: torch.fx.Node) -> torch.fx.GraphModule:
        self.graph.output(tuple(values))
        return torch.fx.GraphModule(self.values, self.graph)


# ---------------------------------------------------------------------------------------------
# Before: two tiny models, their inputs, and the passes that bring them to a pass's preconditions


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(6, 8), nn.Linear(6, 8)

    def forward(self, x, text):
        return F.scaled_dot_product_attention(self.to_q(x), self.to_k(text), self.to_v(text))


class CrossModel(nn.Module):
    """One cross-attention over 3 text tokens (module path "attn"), one head of width 8."""

    def __init__(self):
        super().__init__()
        self.attn = CrossAttention()

    def forward(self, x, timestep, encoder_hidden_states):
        return self.attn(x, encoder_hidden_states)


class ProjModel(nn.Module):
    """One linear layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, timestep):
        return self.proj(x)


def cross_inputs(t: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 5, 8, generator=g), timestep=torch.full((2,), t),
                encoder_hidden_states=torch.randn(2, 3, 6, generator=g))


def proj_inputs(t: float, seed: int) -> dict:
    """Channel 0 sits near 50, the others near 0: its outliers are along channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 8, generator=g)
    x[..., 0] = 50 + 0.5 * x[..., 0]
    return dict(x=x, timestep=torch.full((2,), t))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def prepared(cls, inputs, passes: list[tuple[str, dict]], precision: Precision | None = None, calibrate: bool = False):
    """(model, graph, context) with ``passes`` run; ``calibrate`` runs each STEPS input inside
    ``observing`` after the observe phase (the passes up to the last observer insertion)."""
    model = _model(cls)
    ctx = PassContext(precision=precision or Precision(weight_bits=8, activation_bits=8, keep_io_layers=False))
    gm = capture(model, (), inputs(STEPS[0], 0))
    names = [n for n, _ in passes]
    observe = ("insert_observers", "insert_window_observers", "insert_cfg_observers")
    split = max(i for i, n in enumerate(names) if n in observe) + 1 if calibrate else len(passes)
    gm = Pipeline([create(n, s) for n, s in passes[:split]]).run(gm, ctx)
    if calibrate:
        with observing(gm, ctx.observations), torch.no_grad():
            for i, t in enumerate(STEPS):
                gm(**inputs(t, i))
        if passes[split:]:
            gm = Pipeline([create(n, s) for n, s in passes[split:]]).run(gm, ctx)
    return model, gm, ctx


def run_pass(gm, ctx, name: str, settings: dict | None = None) -> tuple[torch.fx.GraphModule, PassRecord, Any]:
    """The pass under test, by its registered name, through a pipeline (IR verified, record kept)."""
    the_pass = create(name, settings or {})
    pipeline = Pipeline([the_pass])
    gm = pipeline.run(gm, ctx)
    (record,) = pipeline.records
    assert record.name == name and gm.meta[HISTORY_KEY][-1] == name
    return gm, record, the_pass


def _names(gm, predicate) -> tuple[str, ...]:
    return tuple(n.name for n in gm.graph.nodes if predicate(n))


CANONICAL = [("canonicalize_attention", {})]
ANNOTATED = CANONICAL + [("annotate_quantization", {})]
OBSERVED = ANNOTATED + [("insert_observers", {})]
CHOSEN = OBSERVED + [("choose_quant_params", {})]


# ---------------------------------------------------------------------------------------------
# Expected graphs of the two models


SCALE = 1.0 / math.sqrt(8)
CROSS_INFO = AttentionInfo(kind="cross", module="attn", key_sources=("encoder_hidden_states",), key_lengths=(3,),
                           heads=1, scale=SCALE)
CROSS_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v")


def expected_cross(model: CrossModel, quant: dict | None = None, observed: bool = False,
                   outliers: dict | None = None, candidates: int | None = None, windows: bool = False,
                   cfg: bool = False) -> torch.fx.GraphModule:
    """The cross-attention graph in canonical form: linear q, k, v; kᵀ, q·kᵀ, ·scale, softmax, ·v.
    ``quant`` and ``outliers`` map a layer path to its annotation; ``observed`` adds an observer
    before each linear on its input and, before the output matmul, on q, k, v and the probabilities
    (in that order, none on dynamic ones), each taking (value, timestep); ``candidates`` (the
    probabilities' levels) adds, before the probabilities' own, the observer of the candidate
    quantizers' errors, taking (probs, timestep, v); ``windows`` the observer of the probabilities' mass
    along the diagonals right after the softmax, taking (probs, timestep); ``cfg`` the observer of the CFG
    halves' difference right after the output, taking (output, timestep, probs)."""
    quant, outliers = quant or {}, outliers or {}
    e = ExpectedGraph()
    params = {p: (e.attr(f"{p}.weight", fetch_attr(model, f"{p}.weight")), e.attr(f"{p}.bias", fetch_attr(model, f"{p}.bias")))
              for p in CROSS_LINEARS}
    x, t, text = e.input("x"), e.input("timestep"), e.input("encoder_hidden_states")
    e.module("_guards_fn", nn.Module(), x, t, text)
    count = 0

    def observe(value, target):
        nonlocal count
        if observed:
            with e.created_by("insert_observers"):
                e.module(f"lowbit_observers.obs{count}", Observer(target, value.name, "channels_last"), value, t)
            count += 1

    def linear(path, value):
        if quant.get(path) is not None and quant[path].input is not None:
            observe(value, f"{path}:input")
        return e.call(aten.linear.default, value, *params[path], layer=LayerInfo(path, "linear"), quant=quant.get(path),
                      outliers=outliers.get(path))

    q, k, v = linear("attn.to_q", x), linear("attn.to_k", text), linear("attn.to_v", text)
    with e.created_by("canonicalize_attention"):
        kt = e.call(aten.transpose.int, k, -2, -1)
        scores = e.call(aten.matmul.default, q, kt)
        scaled = e.call(aten.mul.Tensor, scores, SCALE)
        probs = e.call(aten.softmax.int, scaled, -1, layer=LayerInfo("attn", "attention"), attention=CROSS_INFO,
                       quant=quant.get("attn"), outliers=outliers.get("attn"))
    if windows:
        with e.created_by("insert_window_observers"):
            e.module("lowbit_observers.window0", AttentionMassObserver("attn:window_mass", probs.name, None), probs, t)
    if quant.get("attn") is not None:
        for operand, value in (("query", q), ("key", k), ("value", v), ("probs", probs)):
            if operand == "probs" and candidates is not None:
                with e.created_by("insert_observers"):
                    observer = AttentionErrorObserver("attn:probs_candidates", probs.name, quant["attn"].start_token, candidates)
                    e.module(f"lowbit_observers.obs{count}", observer, probs, t, v)
                count += 1
            spec = getattr(quant["attn"], operand)
            if spec is not None and spec.mode != "dynamic":
                observe(value, f"attn:{operand}")
    with e.created_by("canonicalize_attention"):
        out = e.call(aten.matmul.default, probs, v)
    if cfg:
        with e.created_by("insert_cfg_observers"):
            e.module("lowbit_observers.cfg0", CFGDifferenceObserver("attn:cfg_difference", out.name), out, t, probs)
    return e.output(out)


def expected_proj(model: ProjModel, quant=None, observed=False, outliers=None) -> torch.fx.GraphModule:
    e = ExpectedGraph()
    w, b = e.attr("proj.weight", model.proj.weight), e.attr("proj.bias", model.proj.bias)
    x, t = e.input("x"), e.input("timestep")
    e.module("_guards_fn", nn.Module(), x, t)
    if observed:
        with e.created_by("insert_observers"):
            e.module("lowbit_observers.obs0", Observer("proj:input", "x", "channels_last"), x, t)
    y = e.call(aten.linear.default, x, w, b, layer=LayerInfo("proj", "linear"), quant=quant, outliers=outliers)
    return e.output(y)


CROSS_QUANT = {p: QuantAnnotation(input=A8, weight=W8) for p in CROSS_LINEARS} | {
    "attn": QuantAnnotation(query=A8, key=A8, value=A8, probs=A8)}
PROJ_QUANT = QuantAnnotation(input=A8, weight=W8)


# ---------------------------------------------------------------------------------------------
# What the passes should compute, from eager tensors


@torch.no_grad()
def cross_operands(model: CrossModel, inputs: dict) -> dict[str, torch.Tensor]:
    """Every quantization target's activation, computed in eager PyTorch."""
    a, x, text = model.attn, inputs["x"], inputs["encoder_hidden_states"]
    q, k, v = a.to_q(x), a.to_k(text), a.to_v(text)
    probs = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return {"attn.to_q:input": x, "attn.to_k:input": text, "attn.to_v:input": text,
            "attn:query": q, "attn:key": k, "attn:value": v, "attn:probs": probs}


def asymmetric_by_hand(lo: torch.Tensor, hi: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uniform parameters over [min(lo, 0), max(hi, 0)] onto [0, qmax]."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def spreads_by_hand(x: torch.Tensor) -> tuple[float, float]:
    """DGQ eq. 4 of a channels-last tensor: (spread of per-channel ranges, spread of per-token ranges)."""
    m = x.reshape(x.shape[0], -1, x.shape[-1])
    ch_min, ch_max = m.amin((0, 1)), m.amax((0, 1))
    tok_min, tok_max = m.amin(2).amin(0), m.amax(2).amax(0)
    spread = lambda lo, hi: float(hi.max() - hi.min() + lo.max() - lo.min())  # noqa: E731
    return spread(ch_min, ch_max), spread(tok_min, tok_max)


# ---------------------------------------------------------------------------------------------
# The tests

STRUCTURAL_TESTS: dict[str, str] = {}  # pass name -> the test of this file that checks its structure


def structural(pass_name: str):
    def register(test):
        STRUCTURAL_TESTS[pass_name] = test.__name__
        return test
    return register


@structural("canonicalize_attention")
def test_canonicalize_attention():
    model, gm, ctx = prepared(CrossModel, cross_inputs, [])
    gm, record, _ = run_pass(gm, ctx, "canonicalize_attention")
    assert_same_structure(gm, expected_cross(model))
    assert record.modified and len(record.added) == 5
    assert record.removed == ("scaled_dot_product_attention",)
    inputs = cross_inputs(500.0, 7)
    torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)  # SDPA sums in another order


@structural("annotate_quantization")
def test_annotate_quantization():
    precision = Precision(weight_bits=8, activation_bits=8, keep_io_layers=False, layers=(
        LayerOverride("attn.to_k", weight_bits=4), LayerOverride("attn.to_v", keep_float=True)))
    model, gm, ctx = prepared(CrossModel, cross_inputs, CANONICAL, precision)
    gm, record, _ = run_pass(gm, ctx, "annotate_quantization")
    quant = {"attn.to_q": QuantAnnotation(input=A8, weight=W8), "attn.to_k": QuantAnnotation(input=A8, weight=W4),
             "attn": QuantAnnotation(query=A8, key=A8, value=A8, probs=A8)}  # attn.to_v: kept in float
    assert_same_structure(gm, expected_cross(model, quant))
    assert record.modified and not (record.added or record.removed or record.rewired or record.context)
    assert record.annotated == _names(gm, lambda n: LAYER_KEY in n.meta and n.meta[LAYER_KEY].path in quant)
    inputs = cross_inputs(500.0, 7)
    torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)


@structural("split_start_token")
def test_split_start_token():
    model, gm, ctx = prepared(CrossModel, cross_inputs, ANNOTATED)
    gm, record, _ = run_pass(gm, ctx, "split_start_token")
    quant = CROSS_QUANT | {"attn": QuantAnnotation(query=A8, key=A8, value=A8, probs=A8, start_token=0)}
    assert_same_structure(gm, expected_cross(model, quant))
    assert record.modified and record.annotated == _names(gm, lambda n: n.target == aten.softmax.int)
    assert not (record.added or record.removed or record.rewired or record.context)
    inputs = cross_inputs(500.0, 7)
    torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)


@structural("insert_observers")
def test_insert_observers():
    precision = Precision(weight_bits=8, activation_bits=8, keep_io_layers=False,
                          layers=(LayerOverride("attn.to_v", keep_float=True),))
    model, gm, ctx = prepared(CrossModel, cross_inputs, ANNOTATED, precision)
    gm, record, _ = run_pass(gm, ctx, "insert_observers")
    quant = {k: v for k, v in CROSS_QUANT.items() if k != "attn.to_v"}  # no annotation, no observer on its input
    assert_same_structure(gm, expected_cross(model, quant, observed=True))
    assert record.modified and len(record.added) == 6 and not (record.removed or record.annotated or record.context)
    assert record.rewired == ()  # observers are side-effect nodes: nobody reads them
    inputs = cross_inputs(900.0, 3)
    with observing(gm, ctx.observations), torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)
    expected = cross_operands(model, inputs)
    assert sorted(ctx.observations.stats) == sorted(t for t in expected if t != "attn.to_v:input")
    for target, per_step in ctx.observations.stats.items():
        assert list(per_step) == [900.0]
        assert per_step[900.0].min == float(expected[target].min()) and per_step[900.0].max == float(expected[target].max())


@structural("choose_quant_params")
def test_choose_quant_params():
    model, gm, ctx = prepared(CrossModel, cross_inputs, OBSERVED, calibrate=True)
    gm, record, _ = run_pass(gm, ctx, "choose_quant_params")
    assert_same_structure(gm, expected_cross(model, CROSS_QUANT, observed=True))  # the graph is unchanged
    targets = [f"{p}:{o}" for p in CROSS_LINEARS for o in ("input", "weight")] + [f"attn:{o}" for o in ("query", "key", "value", "probs")]
    assert sorted(ctx.params) == sorted(targets)
    assert record.modified and record.context == tuple(sorted(f"params:{t}" for t in targets))
    assert not (record.added or record.removed or record.annotated or record.rewired)
    per_step = {t: cross_operands(model, cross_inputs(t, i)) for i, t in enumerate(STEPS)}
    for target in targets:
        p = ctx.params[target]
        layer, operand = target.split(":")
        assert p.spec == getattr(CROSS_QUANT[layer], operand), target
        if operand == "weight":  # symmetric per output channel, min-max range, rounded to nearest
            w = fetch_attr(model, f"{layer}.weight").detach()
            scale = w.abs().amax(1) / 127
            torch.testing.assert_close(p.scale, scale)
            assert torch.equal(p.qvalues, torch.round(w / scale[:, None]).to(torch.int8)), target
            assert torch.count_nonzero(p.zero_point) == 0 and p.timesteps is None
        else:  # asymmetric per tensor, one row per calibrated step, in step order
            steps = sorted(STEPS)
            lo = torch.stack([per_step[t][target].min() for t in steps])
            hi = torch.stack([per_step[t][target].max() for t in steps])
            scale, zero_point = asymmetric_by_hand(lo, hi)
            assert p.timesteps.tolist() == steps and p.qvalues is None
            torch.testing.assert_close(p.scale, scale, msg=lambda m: f"{target} scale: {m}")
            torch.testing.assert_close(p.zero_point, zero_point, msg=lambda m: f"{target} zero point: {m}")


@structural("choose_attention_scheme")
def test_choose_attention_scheme():
    """Probabilities at 8 bits with a run-time scale, scheme "auto", the start column marked: the
    pass decides the annotation from the candidates' output errors, which it measured exactly."""
    precision = Precision(weight_bits=8, activation_bits=8, keep_io_layers=False, attention_scheme="auto",
                          dynamic_attention_scale=True)
    passes = ANNOTATED + [("split_start_token", {}), ("insert_observers", {})]
    model, gm, ctx = prepared(CrossModel, cross_inputs, passes, precision, calibrate=True)
    gm, record, _ = run_pass(gm, ctx, "choose_attention_scheme")
    expected_errors = torch.zeros(len(STEPS), len(CANDIDATES), dtype=torch.float64)
    for i, t in enumerate(sorted(STEPS)):
        ops = cross_operands(model, cross_inputs(t, STEPS.index(t)))
        for c, (scheme, split) in enumerate(CANDIDATES):
            q = quantize_probs_by_hand(ops["attn:probs"], scheme, split)
            expected_errors[i, c] = float(((q - ops["attn:probs"]) @ ops["attn:value"]).double().pow(2).sum())
    scheme, split = CANDIDATES[int(expected_errors.sum(0).argmin())]
    decided = QuantAnnotation(query=A8, key=A8, value=A8, probs=QuantSpec(8, scheme=scheme, mode="dynamic"),
                              start_token=0 if split else None)
    auto = dataclasses.replace(decided, probs=QuantSpec(8, scheme="auto", mode="dynamic"), start_token=0)
    assert_same_structure(gm, expected_cross(model, CROSS_QUANT | {"attn": decided}, observed=True, candidates=256))
    assert record.modified and record.context == ("artifact:attention_schemes",)
    assert record.annotated == _names(gm, lambda n: n.target == aten.softmax.int)
    assert not (record.added or record.removed or record.rewired)
    schemes = ctx.artifacts["attention_schemes"]
    assert schemes.layers == ("attn",) and schemes.steps.tolist() == sorted(STEPS)
    torch.testing.assert_close(schemes.errors[0], expected_errors, rtol=1e-5, atol=1e-12)
    assert schemes.apply("attn", auto) == decided


@structural("insert_window_observers")
def test_insert_window_observers():
    """Every attention gets a mass observer after its softmax, quantized or not; calibration files the
    probabilities' mass per distance bucket |i·n_keys − j·n_queries| // n_queries of one key part."""
    model, gm, ctx = prepared(CrossModel, cross_inputs, CANONICAL)
    gm, record, _ = run_pass(gm, ctx, "insert_window_observers")
    assert_same_structure(gm, expected_cross(model, windows=True))
    assert record.modified and len(record.added) == 1 and not (record.removed or record.annotated or record.context)
    inputs = cross_inputs(900.0, 3)
    with observing(gm, ctx.observations), torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)
    probs = cross_operands(model, inputs)["attn:probs"].double().sum(0)  # (batch,) 5 queries x 3 keys, no head axis
    expected = torch.zeros(4, dtype=torch.float64)  # buckets 0..3 (the longest part + 1)
    for i in range(5):
        for j in range(3):
            expected[abs(i * 3 - j * 5) // 5] += probs[i, j]
    mass = ctx.observations.stats["attn:window_mass"][900.0]
    assert mass.lengths == (3,) and mass.queries == 5 and mass.rows == 10
    torch.testing.assert_close(mass.mass[0, 0], expected)


@structural("choose_attention_windows")
def test_choose_attention_windows():
    """The windows artifact over both steps; this model's keys are text (cross-attention), which windows keep
    whole at any R0 (the search over image keys: tests/passes/test_choose_attention_windows.py)."""
    model, gm, ctx = prepared(CrossModel, cross_inputs, CANONICAL + [("insert_window_observers", {})], calibrate=True)
    gm, record, _ = run_pass(gm, ctx, "choose_attention_windows", {"ratio": 0.6, "full_parts": 0})
    assert_same_structure(gm, expected_cross(model, windows=True))
    assert record.modified and record.context == ("artifact:attention_windows",)
    assert not (record.added or record.removed or record.annotated or record.rewired)
    windows = ctx.artifacts["attention_windows"]
    assert windows.layers == ("attn",) and windows.steps.tolist() == sorted(STEPS)
    for s in range(len(STEPS)):
        assert windows.widths[0, s].tolist() == [[-1]] and windows.saved() == 0.0
        assert windows.lengths[0, s].tolist() == [3] and int(windows.queries[0, s]) == 5


@structural("insert_cfg_observers")
def test_insert_cfg_observers():
    """Every attention's output gets an observer of its CFG halves' L1 difference, quantized or not."""
    model, gm, ctx = prepared(CrossModel, cross_inputs, CANONICAL)
    gm, record, _ = run_pass(gm, ctx, "insert_cfg_observers")
    assert_same_structure(gm, expected_cross(model, cfg=True))
    assert record.modified and len(record.added) == 1 and not (record.removed or record.annotated or record.context)
    inputs = cross_inputs(900.0, 3)
    with observing(gm, ctx.observations), torch.no_grad():
        out = gm(**inputs)
        torch.testing.assert_close(out, model(**inputs), rtol=1e-5, atol=1e-6)
    first, second = out.double().chunk(2)  # a batch of 2: one sample per half
    d = ctx.observations.stats["attn:cfg_difference"][900.0]
    assert d.entries == 5 * 3  # one sample's map: 5 queries x 3 keys
    torch.testing.assert_close(torch.tensor([d.difference, d.first, d.second], dtype=torch.float64),
                               torch.stack([(first - second).abs().sum(), first.abs().sum(), second.abs().sum()]))


@structural("choose_cfg_sharing")
def test_choose_cfg_sharing():
    """The layer shares when Σ|cond − uncond| / Σ|uncond| over both steps is at most the threshold;
    with the unconditional half first (diffusers' layout), the second half is the one computed."""
    model, gm, ctx = prepared(CrossModel, cross_inputs, CANONICAL + [("insert_cfg_observers", {})], calibrate=True)
    halves = [model(**cross_inputs(t, i)).detach().double().chunk(2) for i, t in enumerate(STEPS)]
    relative = sum(float((c - u).abs().sum()) for u, c in halves) / sum(float(u.abs().sum()) for u, _ in halves)
    for threshold, shared in ((relative * 1.01, True), (relative * 0.99, False)):
        _, record, _ = run_pass(gm, ctx, "choose_cfg_sharing", {"threshold": threshold, "layout": "unconditional_first"})
        assert record.modified and record.context == ("artifact:cfg_sharing",)
        assert not (record.added or record.removed or record.annotated or record.rewired)
        sharing = ctx.artifacts["cfg_sharing"]
        assert sharing.layers == ("attn",) and bool(sharing.shared[0]) is shared
        assert sharing.computed_half("attn") == (1 if shared else -1)
    assert_same_structure(gm, expected_cross(model, cfg=True))
    with pytest.raises(PassError, match="cfg_layout"):
        run_pass(gm, ctx, "choose_cfg_sharing")  # CrossModel says nothing about its CFG layout


def quantize_probs_by_hand(p: torch.Tensor, scheme: str, split: bool) -> torch.Tensor:
    """8-bit probabilities with the scale max(P) (the start column 0 left out of it and kept when ``split``)."""
    rest = p[..., 1:] if split else p
    s = rest.amax()
    if scheme == "log2":
        q = s * 2.0 ** -torch.clamp(torch.round(-torch.log2(rest.clamp_min(1e-30) / s)), 0, 255)
    else:
        q = torch.clamp(torch.round(rest / (s / 255)), 0, 255) * (s / 255)
    return torch.cat([p[..., :1], q], -1) if split else q


@structural("detect_outlier_dim")
def test_detect_outlier_dim():
    model, gm, ctx = prepared(CrossModel, cross_inputs, OBSERVED, calibrate=True)
    gm, record, _ = run_pass(gm, ctx, "detect_outlier_dim")
    seen = [cross_operands(model, cross_inputs(t, i)) for i, t in enumerate(STEPS)]
    spreads = {target: spreads_by_hand(torch.cat([s[target] for s in seen])) for target in seen[0]}

    def outlier(target, text_tokens):
        return OutlierDim(*spreads[target], text_tokens=text_tokens)

    # text positions: what the text projections read, and the keys and values they make
    outliers = {"attn.to_q": {"input": outlier("attn.to_q:input", False)},
                "attn.to_k": {"input": outlier("attn.to_k:input", True)},
                "attn.to_v": {"input": outlier("attn.to_v:input", True)},
                "attn": {"query": outlier("attn:query", False), "key": outlier("attn:key", True),
                         "value": outlier("attn:value", True)}}  # no outlier dimension for probabilities
    assert_same_structure(gm, expected_cross(model, CROSS_QUANT, observed=True, outliers=outliers))
    assert record.modified and not (record.added or record.removed or record.rewired or record.context)
    assert record.annotated == _names(gm, lambda n: QUANT_KEY in n.meta)


@structural("group_activations")
def test_group_activations():
    model, gm, ctx = prepared(ProjModel, proj_inputs, CHOSEN + [("detect_outlier_dim", {})], calibrate=True)
    weight_params = ctx.params["proj:weight"]
    gm, record, _ = run_pass(gm, ctx, "group_activations", {"groups": 2})

    steps = sorted(STEPS)
    xs = {t: proj_inputs(t, i)["x"] for i, t in enumerate(STEPS)}
    # channel 0 (near 50) is a group of its own at every step; K-means numbers the two groups as it likes
    labels = ctx.params["proj:input"].spec.groups
    outlier_group = labels[0][0]
    groups = tuple(tuple(outlier_group if c == 0 else 1 - outlier_group for c in range(8)) for _ in steps)
    grouped = QuantSpec(8, granularity="group", mode="per_step", axis=-1, groups=groups)
    outliers = {"input": OutlierDim(*spreads_by_hand(torch.cat(list(xs.values()))))}
    assert outliers["input"].chosen == "channel"
    expected = expected_proj(model, QuantAnnotation(input=grouped, weight=W8), observed=True, outliers=outliers)
    assert_same_structure(gm, expected)
    assert record.modified and record.context == ("params:proj:input",) and record.annotated == ("linear",)
    assert not (record.added or record.removed or record.rewired)
    assert ctx.params["proj:weight"] is weight_params

    p = ctx.params["proj:input"]
    assert p.spec == grouped and p.timesteps.tolist() == steps
    scales, zero_points = [], []
    for t in steps:
        x = xs[t].reshape(-1, 8)
        ch_min, ch_max = x.amin(0), x.amax(0)
        lo = torch.stack([ch_min[:1].min(), ch_min[1:].min()])
        hi = torch.stack([ch_max[:1].max(), ch_max[1:].max()])
        scale, zero_point = asymmetric_by_hand(lo, hi)
        index = torch.tensor([0] + [1] * 7)
        scales.append(scale[index])
        zero_points.append(zero_point[index])
    torch.testing.assert_close(p.scale, torch.stack(scales))  # one scale per channel, shape (steps, channels)
    torch.testing.assert_close(p.zero_point, torch.stack(zero_points))


@structural("reconstruct_weights")
def test_reconstruct_weights():
    model, gm, ctx = prepared(ProjModel, proj_inputs, CHOSEN, calibrate=True)
    ctx.samples = [proj_inputs(t, 10 + i) for i, t in enumerate(STEPS)]
    before = dict(ctx.params)
    gm, record, reconstruct = run_pass(gm, ctx, "reconstruct_weights", {"iterations": 5, "samples": 2})
    assert_same_structure(gm, expected_proj(model, PROJ_QUANT, observed=True))  # the graph is unchanged
    assert not (record.added or record.removed or record.annotated or record.rewired)
    # only the integer weights may change, on the same grid
    assert ctx.params.keys() == before.keys() and ctx.params["proj:input"] is before["proj:input"]
    nearest, learned = before["proj:weight"], ctx.params["proj:weight"]
    changed = learned is not nearest
    assert record.context == (("params:proj:weight",) if changed else ()) and record.modified == changed
    assert learned.spec == nearest.spec and torch.equal(learned.scale, nearest.scale)
    assert torch.equal(learned.zero_point, nearest.zero_point) and learned.timesteps is None
    w = model.proj.weight.detach()
    assert learned.qvalues.dtype == (torch.uint8 if learned.spec.bits <= 4 else torch.int8)
    assert (learned.codes.float() - w / learned.scale[:, None]).abs().max() < 1  # floor or ceil of the weight

    # the recorded unit errors are those of eager linears with these weights
    def error(p: OperandParams) -> float:
        wq = p.codes.float() * p.scale[:, None]
        errs = [(F.linear(s["x"], wq, model.proj.bias) - model.proj(s["x"])).pow(2).reshape(2, -1).sum(1).mean()
                for s in ctx.samples]
        return float(sum(errs) / len(errs))

    with torch.no_grad():
        assert list(reconstruct.losses) == ["proj"]
        near_err, kept_err = reconstruct.losses["proj"]
        assert math.isclose(near_err, error(nearest), rel_tol=1e-4)
        assert math.isclose(kept_err, error(learned), rel_tol=1e-4) and kept_err <= near_err


def expected_converted(model: CrossModel, ctx: PassContext) -> torch.fx.GraphModule:
    """The cross-attention graph with lowbit ops: quantized linears, fake-quantized q/k/v and one
    quantized attention, every per-step parameter picked by select_timestep from the timestep."""
    e = ExpectedGraph()
    biases = {p: e.attr(f"{p}.bias", fetch_attr(model, f"{p}.bias")) for p in CROSS_LINEARS}  # float weights dropped
    x, t, text = e.input("x"), e.input("timestep"), e.input("encoder_hidden_states")
    e.module("_guards_fn", nn.Module(), x, t, text)

    def buffer(target, field):
        name = f"{target.replace('.', '_').replace(':', '__')}__{field}"
        return e.attr(f"lowbit_params.{name}", getattr(ctx.params[target], field))

    def per_step(target):
        scale, zero_point, steps = (buffer(target, f) for f in ("scale", "zero_point", "timesteps"))
        return (e.op(SelectTimestep(table=scale, timesteps=steps, timestep=t)),
                e.op(SelectTimestep(table=zero_point, timesteps=steps, timestep=t)))

    with e.created_by("convert_to_quantized_ops"):
        linears = []
        for path, value in zip(CROSS_LINEARS, (x, text, text)):
            weight, weight_scale = buffer(f"{path}:weight", "qvalues"), buffer(f"{path}:weight", "scale")
            scale, zero_point = per_step(f"{path}:input")
            linears.append(e.op(QuantizedLinear(x=value, weight=weight, weight_scale=weight_scale, bias=biases[path],
                                                input_scale=scale, input_zero_point=zero_point, input_qmin=0, input_qmax=255),
                                layer=LayerInfo(path, "linear"), quant=CROSS_QUANT[path]))
        fake = []
        for operand, value in zip(("query", "key", "value"), linears):
            scale, zero_point = per_step(f"attn:{operand}")
            fake.append(e.op(FakeQuant(x=value, scale=scale, zero_point=zero_point, qmin=0, qmax=255),
                             layer=LayerInfo("attn", "attention")))
        probs_scale, probs_zero_point = per_step("attn:probs")
        out = e.op(QuantizedAttention(q=fake[0], k=fake[1], v=fake[2], attn_mask=None, scale=SCALE, probs_scale=probs_scale,
                                      probs_zero_point=probs_zero_point, probs_scheme="uniform", probs_qmin=0, probs_qmax=255,
                                      start_token=-1, dynamic_scale=False),
                   layer=LayerInfo("attn", "attention"), quant=CROSS_QUANT["attn"], attention=CROSS_INFO)
    return e.output(out)


@structural("convert_to_quantized_ops")
def test_convert_to_quantized_ops():
    model, gm, ctx = prepared(CrossModel, cross_inputs, CHOSEN, calibrate=True)
    params = dict(ctx.params)
    gm, record, _ = run_pass(gm, ctx, "convert_to_quantized_ops")
    assert_same_structure(gm, expected_converted(model, ctx))
    assert ctx.params == params and not record.context  # convert only reads the parameters
    assert record.modified and len(record.removed) == 6 + 3 + 3 + 5 + 1  # observers, linears, float weights, attention
    assert not hasattr(gm, "lowbit_observers") and not hasattr(gm.attn.to_q, "weight")
    assert model.attn.to_q.weight.dtype == torch.float32  # the user's model keeps its weights
    for i, t in enumerate(STEPS):  # W8A8, ranges calibrated on these very inputs
        inputs = cross_inputs(t, i)
        with torch.no_grad():
            got, want = gm(**inputs), model(**inputs)
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
        assert float((got - want).norm() / want.norm()) < 0.03


def expected_fake_quantized(model: nn.Module, ctx: PassContext, weight: QuantSpec = W8) -> torch.fx.GraphModule:
    """The one-linear graph with its weight and its input routed through fake quantizers (no observers)."""
    e = ExpectedGraph()
    w, b = e.attr("proj.weight", model.proj.weight), e.attr("proj.bias", model.proj.bias)
    x, t = e.input("x"), e.input("timestep")
    e.module("_guards_fn", nn.Module(), x, t)
    with e.created_by("insert_fake_quantizers"):
        wq = e.module("lowbit_fake_quantizers.fq0", WeightFakeQuantizer("proj:weight", model.proj.weight, weight.bits), w)
        xq = e.module("lowbit_fake_quantizers.fq1", OperandFakeQuantizer("proj:input", A8, ctx.params["proj:input"]), x, t)
    y = e.call(aten.linear.default, xq, wq, b, layer=LayerInfo("proj", "linear"), quant=dataclasses.replace(PROJ_QUANT, weight=weight))
    return e.output(y)


@structural("insert_fake_quantizers")
def test_insert_fake_quantizers():
    model, gm, ctx = prepared(ProjModel, proj_inputs, CHOSEN, calibrate=True)
    converted = Pipeline([create("convert_to_quantized_ops")]).run(copy.deepcopy(gm), PassContext(params=dict(ctx.params)))
    gm, record, _ = run_pass(gm, ctx, "insert_fake_quantizers")
    assert_same_structure(gm, expected_fake_quantized(model, ctx))
    assert record.modified and len(record.added) == 2 and len(record.removed) == 1 and record.rewired and not record.context
    assert model.proj.weight.requires_grad and not gm.proj.weight.requires_grad  # frozen in the graph, not in the model
    # at their final bit-widths with Δ = 0 the fake quantizers compute what the converted graph computes
    for i, t in enumerate(STEPS):
        inputs = proj_inputs(t, 20 + i)
        with torch.no_grad():
            torch.testing.assert_close(gm(**inputs), converted(**inputs), rtol=1e-5, atol=1e-5)


def trained_proj(steps: int = 8):
    """The one-linear model with fake quantizers, trained ``steps`` steps of plain QAT at 4 bits."""
    precision = Precision(weight_bits=4, activation_bits=8, keep_io_layers=False)
    model, gm, ctx = prepared(ProjModel, proj_inputs, CHOSEN + [("insert_fake_quantizers", {})], precision, calibrate=True)
    ctx.samples = [proj_inputs(t, 10 + i) for i, t in enumerate(STEPS)]
    gm, record, _ = run_pass(gm, ctx, "train_quantized", {"qat_steps": steps, "qat_schedule": [[0, 1]], "lr": 1e-3, "samples": 2})
    return model, gm, ctx, record


@structural("train_quantized")
def test_train_quantized():
    model, gm, ctx, record = trained_proj()
    assert_same_structure(gm, expected_fake_quantized(model, ctx, W4))  # the graph is unchanged: training moves Δ only
    assert record.modified and record.context == ("artifact:qat_history",)
    history = ctx.artifacts["qat_history"]
    # (that training lowers the error is tested on every diffusers family in tests/test_qat.py: on this one linear,
    # whose input has a channel near 50, 8-bit input rounding dominates and the loss stays at 0.367 with lr 1e-4)
    assert history.bits.tolist() == [4.0] * 8 and torch.isfinite(history.loss).all()
    assert gm.lowbit_fake_quantizers.fq0.delta.abs().sum() > 0


@structural("fold_fake_quantizers")
def test_fold_fake_quantizers():
    model, gm, ctx, _ = trained_proj()
    trained = (model.proj.weight + gm.lowbit_fake_quantizers.fq0.delta).detach()
    gm, record, _ = run_pass(gm, ctx, "fold_fake_quantizers")
    assert_same_structure(gm, expected_proj(model, dataclasses.replace(PROJ_QUANT, weight=W4)))
    assert record.modified and len(record.removed) == 2 and record.context == ("params:proj:weight",)
    assert not hasattr(gm, "lowbit_fake_quantizers")
    p = ctx.params["proj:weight"]  # FraQAT's grid at 4 bits over the trained weight: max|W + Δ| / 7 per channel
    scale = trained.abs().amax(1) / 7
    torch.testing.assert_close(p.scale, scale)
    assert torch.equal(p.codes, torch.clamp(torch.round(trained / scale[:, None]), -8, 7).to(torch.int8))


def test_every_registered_pass_has_a_structural_test():
    lowbits = {name for name, cls in PASSES.items() if cls.__module__.startswith("lowbit.")}  # not the test suite's own
    missing = sorted(lowbits - set(STRUCTURAL_TESTS))
    assert not missing, (f"registered passes without a Before/Expected test in {__name__}: {missing}; write one "
                         f"marked @structural(name) that compares the pass's output with assert_same_structure")
    stale = sorted(set(STRUCTURAL_TESTS) - set(PASSES))
    assert not stale, f"structural tests for passes that are not registered: {stale}"
    for name, test in STRUCTURAL_TESTS.items():
        assert test.startswith("test_") and callable(globals().get(test)), f"{name}: {test} is not a test of this file"
