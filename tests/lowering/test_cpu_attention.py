"""Quantized attention on the CPU target: integer codes on the bf16 matrix units, query tiles, SDPA."""

import copy

import pytest
import torch

import lowbit
from lowbit.ir.ops import attention_reference, uniform_quantize
from lowbit.ir.schema import QuantizedAttention
from lowbit.lowering.backend import compile_reports
from lowbit.lowering.integer_attention import integer_attention, integer_attention_form
from lowbit.lowering.native import has_bf16_brgemm
from lowbit.lowering.tiled_attention import tiled_attention
from lowbit.models.tiny import build
from tests.conftest import calibration_set

needs_kernel = pytest.mark.skipif(not has_bf16_brgemm(), reason="the integer attention kernel needs AVX512 and ATen's "
                                  "bf16 brgemm (AMX or AVX512-BF16); the tiled form covers other hosts")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _quantizer(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric 8-bit (scale, zero point) over x's range, per tensor or per token."""
    lo, hi = (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)) if per_token else (x.amin(), x.amax())
    scale = (hi - lo) / 255
    return scale, torch.round(-lo / scale)


def _assert_equal_but_for_boundary_codes(out: torch.Tensor, reference: torch.Tensor) -> None:
    """The same arithmetic up to float32 rounding of the logits and softmax, which now and then moves
    a probability that lies on a code boundary to the next code: a row of the output off by one code
    step times a value. So nearly every row is equal, and the rest differ a little."""
    rows_off = ((out - reference).abs() > 1e-5 * (1 + reference.abs())).any(-1)
    assert rows_off.float().mean() < 0.02, f"{int(rows_off.sum())} of {rows_off.numel()} rows differ"
    assert _relative(out, reference) < 2e-3


def _probs_grid(scheme: str, bits: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(scale, zero point, qmax) of a static probability grid: uniform on [0, 1], log2 below 1."""
    qmax = 2**bits - 1
    return (torch.tensor(1.0), None, qmax) if scheme == "log2" else (torch.tensor(1.0 / qmax), torch.tensor(0.0), qmax)


CASES = {  # batch, heads, queries, keys, dim, value dim, scheme, probability bits, start token, per-token q/k, k's size
    "uniform": (2, 3, 50, 77, 72, 72, "uniform", 8, -1, False, 2),
    "log2, start token": (2, 2, 64, 64, 64, 64, "log2", 8, 0, False, 2),
    "per-token, odd dims": (1, 2, 33, 45, 63, 40, "uniform", 8, 0, True, 2),
    "6-bit probabilities, long keys": (1, 2, 40, 300, 32, 32, "uniform", 6, -1, False, 2),
    # logits hundreds apart: most exponentials fall below float's normal range (the kernel makes them 0)
    "widely spread logits": (1, 2, 40, 300, 32, 32, "uniform", 8, -1, False, 60),
}


@needs_kernel
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_integer_attention_equals_reference(case):
    batch, heads, queries, keys, dim, vdim, scheme, bits, start, per_token, k_size = case
    g = torch.Generator().manual_seed(queries + keys)
    x = [torch.randn(batch, heads, n, d, generator=g) * s for n, d, s in ((queries, dim, 1), (keys, dim, k_size), (keys, vdim, 1))]
    params = [_quantizer(x[0], per_token), _quantizer(x[1], per_token), _quantizer(x[2], False)]
    q, k, v = (uniform_quantize(t, s, z, 0, 255) for t, (s, z) in zip(x, params))
    probs_scale, probs_zero_point, qmax = _probs_grid(scheme, bits)
    scale = dim**-0.5
    reference = attention_reference(q, k, v, None, scale, probs_scale, probs_zero_point, scheme, 0, qmax, start, False)
    out = integer_attention(*x, *params[0], *params[1], *params[2], [0, 255] * 3, scale, probs_scale, probs_zero_point,
                            scheme, 0, qmax, start, -1)
    _assert_equal_but_for_boundary_codes(out.transpose(1, 2), reference)


@needs_kernel
def test_integer_attention_shares_the_conditional_half():
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(4, 2, 24, 16, generator=g) for _ in range(3)]
    params = [_quantizer(t, False) for t in x]
    args = ([0, 255] * 3, 0.25, torch.tensor(1 / 255), torch.tensor(0.0), "uniform", 0, 255, -1)
    shared = integer_attention(*x, *params[0], *params[1], *params[2], *args, 1)
    half = integer_attention(*(t[2:] for t in x), *params[0], *params[1], *params[2], *args, -1)
    torch.testing.assert_close(shared, torch.cat([half, half]))


@needs_kernel
def test_integer_attention_reads_any_layout():
    """Heads split from tokens (a model's (B, L, H, D) viewed as (B, H, L, D)), and a last dim with a
    stride (copied inside): the same output as contiguous operands."""
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(2, 24, 3, 16, generator=g) for _ in range(3)]
    params = [p for t in x for p in _quantizer(t, False)]
    args = ([0, 255] * 3, 0.25, torch.tensor(1 / 255), torch.tensor(0.0), "uniform", 0, 255, 0, -1)
    contiguous = integer_attention(*(t.transpose(1, 2).contiguous() for t in x), *params, *args)
    heads_split = integer_attention(*(t.transpose(1, 2) for t in x), *params, *args)
    strided_last = integer_attention(*(t.transpose(1, 2).transpose(2, 3).contiguous().transpose(2, 3) for t in x), *params, *args)
    torch.testing.assert_close(heads_split, contiguous, rtol=0, atol=0)
    torch.testing.assert_close(strided_last, contiguous, rtol=0, atol=0)


TILED = {  # mask, scheme, dynamic scale, start token
    "static uniform": (None, "uniform", False, -1),
    "dynamic log2, start token": (None, "log2", True, 0),
    "a mask per query": ("rows", "uniform", False, -1),
    "a key mask broadcast over queries": ("keys", "log2", True, 0),
}


@pytest.mark.parametrize("case", TILED.values(), ids=TILED.keys())
def test_tiled_attention_equals_reference(case):
    mask_kind, scheme, dynamic, start = case
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    mask = {"rows": torch.rand(2, 1, 37, 37, generator=g) > 0.3, "keys": torch.rand(2, 1, 1, 37, generator=g) > 0.3}.get(mask_kind)
    if mask is not None:
        mask[..., 1] = True  # no row entirely masked
    probs_scale, probs_zero_point, qmax = _probs_grid(scheme, 8)
    args = (None if dynamic else probs_scale, probs_zero_point, scheme, 0, qmax, start, dynamic)
    reference = attention_reference(q, k, v, mask, 0.25, *args)
    out = tiled_attention(q, k, v, mask, 0.25, *args, -1, 6 * 37 * 5)  # tiles of 5 query rows: 8 tiles, the last short
    _assert_equal_but_for_boundary_codes(out, reference)


def _attention_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QuantizedAttention.overload()]


@needs_kernel
@pytest.mark.parametrize("recipe, chosen", [("minmax-w8a8", True), ("dgq-w8a8", False), ("minmax-w8a16", False)])
def test_the_integer_form_is_chosen_where_it_is_exact(recipe, chosen):
    """Static 8-bit grids everywhere: chosen; DGQ's dynamic probability scale, or 16-bit q/k/v: not."""
    qmodel = lowbit.quantize(build("pixart"), recipe, calibration_set("pixart"), progress=False)
    gm = copy.deepcopy(qmodel.graph_module)
    forms = [integer_attention_form(node) for node in _attention_nodes(gm)]
    assert forms and all((form is not None) == chosen for form in forms)


@needs_kernel
def test_compiled_model_runs_the_integer_kernel(monkeypatch):
    monkeypatch.setattr("lowbit.lowering.tiled_attention.INLINE_SCORES", 0)  # the tiny model's calls are small
    torch._dynamo.reset()
    model = build("pixart")
    calibration = calibration_set("pixart")
    qmodel = lowbit.quantize(model, "minmax-w8a8", calibration, progress=False)
    kwargs = calibration[1][1]
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = torch.compile(qmodel, backend="lowbit")(**kwargs)[0]
    eager, fp = qmodel(**kwargs)[0], model(**kwargs)[0]
    assert "lowbit_native::integer_attention" in {event.key for event in profile.key_averages()}
    assert compile_reports()[-1].translation.lowered["quantized_attention"] == len(_attention_nodes(qmodel.graph_module))
    assert _relative(out, eager) < 0.05 * _relative(eager, fp)


def test_small_attention_runs_inline():
    """Below INLINE_SCORES an opaque op's fixed cost outweighs the work: the reference arithmetic is inlined."""
    torch._dynamo.reset()
    calibration = calibration_set("pixart")
    qmodel = lowbit.quantize(build("pixart"), "minmax-w8a8", calibration, progress=False)
    with torch.no_grad(), torch.profiler.profile() as profile:
        torch.compile(qmodel, backend="lowbit")(**calibration[1][1])
    keys = {event.key for event in profile.key_averages()}
    assert not {"lowbit_native::integer_attention", "lowbit_cpu::tiled_attention"} & keys
