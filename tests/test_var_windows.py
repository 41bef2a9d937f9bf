"""MDWA and ASC on a VAR config no shipped model uses: windows searched from calibration, R0 = 1 dense,
the eager masked form equal to SDPA under the same mask, saved and loaded; attention shared across the
CFG halves; both exported to the HTP."""

import pytest
import torch

import lowbit
from lowbit.ir.attention_windows import ATTENTION_WINDOWS
from lowbit.ir.cfg_sharing import CFG_SHARING
from lowbit.ir.schema import QuantizedAttention, schema_class
from lowbit.lowering.native import native_built
from lowbit.lowering.windowed_attention import CPU_TILE, windowed_attention_form
from lowbit.recipes import get_recipe
from lowbit.reports.accounting import attention_saved
from tests.conftest import small_var, var_calibration


def windowed(recipe: str, ratio: float, geometry: str = "band"):
    """``recipe`` with windows at R0 = ``ratio`` on every part past the first scale's (the small VAR has
    three scales; LiteVAR's default keeps three parts whole, which would leave nothing to window)."""
    return get_recipe(recipe).with_pass("insert_window_observers", geometry=geometry).with_pass(
        "choose_attention_windows", ratio=ratio, full_parts=1)


@pytest.fixture(scope="module")
def var_setup():
    var, tokenizer, step = small_var()
    return var, tokenizer, step, var_calibration(var, tokenizer, step)


def masked_by_hand(step, windows, kwargs) -> torch.Tensor:
    """The step's logits with each block's SDPA given the windows' boolean mask at this step."""
    s = windows.steps.tolist().index(float(kwargs["scale"][0]))
    h, cond = kwargs["hidden"], kwargs["cond"]
    for i, block in enumerate(step.blocks):
        keep = windows.keep(windows.layers.index(f"blocks.{i}.attn"), s)
        h, _ = block(h, cond, (kwargs["past_keys"][i], kwargs["past_values"][i]), keep)
    return step.head(step.head_nm(h, cond))


def test_windows_are_searched_per_scale_block_and_head(var_setup):
    var, tokenizer, step, calibration = var_setup
    qmodel = lowbit.quantize(step, windowed("mdwa-1", 0.7), calibration, step_arg="scale", progress=False)
    windows = qmodel.artifacts[ATTENTION_WINDOWS]
    assert windows.layers == ("blocks.0.attn", "blocks.1.attn") and windows.steps.tolist() == [0.0, 1.0, 2.0]
    assert windows.lengths[0].tolist() == [[1, 0, 0], [1, 4, 0], [1, 4, 16]]  # the cache's scales (1, 2, 4)²
    assert windows.widths.shape == (2, 3, 3, 3)  # layers, steps, heads, parts
    assert windows.widths[:, :, :, 0].eq(-1).all()  # the first part stays whole
    assert windows.widths[:, 2, :, 2].gt(0).all() and windows.saved() > 0
    ops = [QuantizedAttention.of(n) for n in qmodel.graph_module.graph.nodes if schema_class(n) is QuantizedAttention]
    assert len(ops) == 2 and all(op.windowed and not op.quantizes_probs for op in ops)


@pytest.mark.parametrize("geometry", ["band", "grid"])
def test_r0_of_one_is_dense_and_windows_mask_as_sdpa_does(var_setup, geometry):
    var, tokenizer, step, calibration = var_setup
    dense = lowbit.quantize(step, "mdwa-1", calibration, step_arg="scale", progress=False)
    sparse = lowbit.quantize(step, windowed("mdwa-1", 0.6, geometry), calibration, step_arg="scale", progress=False)
    windows = sparse.artifacts[ATTENTION_WINDOWS]
    grids = [[1, 1], [2, 2], [4, 4]] if geometry == "grid" else [1, 4, 16]
    assert windows.lengths[0, -1].tolist() == grids and windows.saved() > 0
    for _, kwargs in calibration[-4:]:
        with torch.no_grad():
            fp = step(**kwargs)[0]
            torch.testing.assert_close(dense(**kwargs)[0], fp, rtol=1e-5, atol=1e-5)  # SDPA sums in another order
            windowed_logits = sparse(**kwargs)[0]
            torch.testing.assert_close(windowed_logits, masked_by_hand(step, windows, kwargs), rtol=1e-5, atol=1e-5)
    assert float((windowed_logits - fp).norm() / fp.norm()) > 1e-3  # the windows do drop mass


@pytest.mark.parametrize("geometry", ["band", "grid"])
def test_windows_compose_with_quantization_and_survive_save_load(var_setup, tmp_path, geometry):
    var, tokenizer, step, calibration = var_setup
    qmodel = lowbit.quantize(step, windowed("minmax-w8a8", 0.8, geometry), calibration, step_arg="scale", progress=False)
    lowbit.save(qmodel, tmp_path / "windowed")
    loaded = lowbit.load(tmp_path / "windowed", step)
    for table in ("widths", "lengths"):
        assert torch.equal(getattr(loaded.artifacts[ATTENTION_WINDOWS], table), getattr(qmodel.artifacts[ATTENTION_WINDOWS], table))
    for _, kwargs in calibration[-3:]:
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(loaded(**kwargs), qmodel(**kwargs)))
    attention = [n for n in qmodel.graph_module.graph.nodes if schema_class(n) is QuantizedAttention]
    reasons = [windowed_attention_form(n, CPU_TILE)[1] for n in attention]  # no FlexAttention form: said why
    assert len(reasons) == 2 and all("uniform-quantized probabilities" in r for r in reasons)


@pytest.mark.parametrize("geometry", ["band", "grid"])
def test_windowed_var_runs_on_the_htp_as_eager(var_setup, tmp_path, geometry):
    from lowbit.evaluation.qnn import cfg_examples
    from lowbit.lowering.onnx_qnn import HTPDenoiser, export_schedule

    var, tokenizer, step, calibration = var_setup
    qmodel = lowbit.quantize(step, windowed("minmax-w8a8", 0.6, geometry), calibration, step_arg="scale", progress=False)
    examples = cfg_examples(calibration, 2, "scale")
    export_schedule(qmodel, examples, tmp_path / "qnn", calibration=calibration, progress=False)
    htp = HTPDenoiser(tmp_path / "qnn", "scale")  # every scale's session loads with CPU fallback disabled
    unwindowed = lowbit.quantize(step, "minmax-w8a8", calibration, step_arg="scale", progress=False)
    for scale, kwargs in examples.items():
        with torch.no_grad():
            got, want, other = htp(**kwargs)[0], qmodel(**kwargs)[0], unwindowed(**kwargs)[0]
        error = float((got - want).norm() / want.norm())
        assert error < 0.02, (scale, error)  # as the unwindowed export (tests/test_var_quantize.py): 16-bit grids
        if scale == 2.0:  # the windowed scale: the HTP computes the windowed model, not the dense one
            assert error < 0.5 * float((other - want).norm() / want.norm()), scale


def test_cfg_sharing_computes_the_conditional_half_and_gives_it_to_both(var_setup):
    var, tokenizer, step, calibration = var_setup
    every = lowbit.quantize(step, "asc", calibration, step_arg="scale", progress=False)
    sharing = every.artifacts[CFG_SHARING]
    assert sharing.layout == "conditional_first" and sharing.shared.all()  # VAR batches [class; null]
    assert (sharing.difference[:, 1:] > 0).all()  # the halves differ once the class matters
    ops = [QuantizedAttention.of(n) for n in every.graph_module.graph.nodes if schema_class(n) is QuantizedAttention]
    assert [op.shared_half for op in ops] == [0, 0]
    _, kwargs = calibration[-1]
    with torch.no_grad():
        got = every(**kwargs)[0]
        half = {k: v[:4] if isinstance(v, torch.Tensor) else tuple(t[:4] for t in v) for k, v in kwargs.items()}
        cond_only = step(**half)[0]
    torch.testing.assert_close(got[:4], cond_only, rtol=1e-5, atol=1e-5)  # the conditional half is computed as is
    assert not torch.allclose(got[4:], step(**kwargs)[0][4:], atol=1e-4)  # the unconditional half took its attention
    # a threshold below every layer's difference shares nothing
    low = float(sharing.difference[:, 1:].min()) / 2
    assert not lowbit.quantize(step, f"asc-{low:.6f}", calibration, step_arg="scale",
                               progress=False).artifacts[CFG_SHARING].shared.any()


def test_cfg_sharing_and_windows_export_to_the_htp(var_setup, tmp_path):
    from lowbit.evaluation.qnn import cfg_examples
    from lowbit.lowering.onnx_qnn import HTPDenoiser, export_schedule

    var, tokenizer, step, calibration = var_setup
    recipe = windowed("minmax-w8a8", 0.6).with_pass("insert_cfg_observers").with_pass("choose_cfg_sharing")
    qmodel = lowbit.quantize(step, recipe, calibration, step_arg="scale", progress=False)
    assert attention_saved(qmodel.artifacts) > attention_saved({ATTENTION_WINDOWS: qmodel.artifacts[ATTENTION_WINDOWS]}) > 0
    examples = cfg_examples(calibration, 2, "scale")
    export_schedule(qmodel, examples, tmp_path / "qnn", calibration=calibration, progress=False)
    htp = HTPDenoiser(tmp_path / "qnn", "scale")  # loads with CPU fallback disabled
    for scale, kwargs in examples.items():
        with torch.no_grad():
            got, want = htp(**kwargs)[0], qmodel(**kwargs)[0]
        assert float((got - want).norm() / want.norm()) < 0.02, scale  # as the unshared export


@pytest.mark.parametrize("kernel", ["flex", pytest.param("native", marks=pytest.mark.skipif(
    not native_built(), reason="lowbit's C++ kernels build on AVX512 hosts only"))])
@pytest.mark.parametrize("geometry, share", [("band", False), ("band", True), ("grid", False)])
def test_windows_compile_to_a_block_sparse_kernel_as_eager(var_setup, monkeypatch, kernel, geometry, share):
    """The compiled form skips the tiles outside the windows (FlexAttention, or lowbit's C++ kernel where
    it builds) and computes what eager does."""
    from lowbit.lowering import windowed_attention
    from lowbit.lowering.backend import compile_reports

    calls = []
    form = getattr(windowed_attention, f"{kernel}_windowed")
    monkeypatch.setattr(windowed_attention, "native_built", lambda: kernel == "native")
    monkeypatch.setattr(windowed_attention, f"{kernel}_windowed", lambda *args: calls.append(1) or form(*args))
    var, tokenizer, step, calibration = var_setup
    recipe = windowed("mdwa-1", 0.6, geometry)
    if share:
        recipe = recipe.with_pass("insert_cfg_observers").with_pass("choose_cfg_sharing")
    qmodel = lowbit.quantize(step, recipe, calibration, step_arg="scale", progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(qmodel, backend="lowbit")
    for _, kwargs in calibration[-3:]:  # every scale: its shapes compile a graph of their own
        with torch.no_grad():
            want, got = qmodel(**kwargs)[0], compiled(**kwargs)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float arithmetic in another order
    translation = compile_reports()[-1].translation
    assert translation.lowered["quantized_attention"] == 2 and not translation.fallbacks
    assert calls  # the windowed scale ran the chosen kernel
