"""The "lowbit" backend's Triton target; without CUDA its kernels run in Triton's interpreter on CPU."""

import os

import pytest
import torch

import lowbit
from lowbit.lowering.backend import compile_reports
from lowbit.models.tiny import build
from lowbit.recipes import Recipe
from tests.conftest import MIXED_RECIPE, calibration_set

# The model and its inputs stay on the CPU, where Triton kernels run only in its interpreter (which
# @triton.jit reads from TRITON_INTERPRET when a kernel module is imported). Without CUDA,
# tests/conftest.py turns it on before anything is imported, so this skips only where TRITON_INTERPRET
# was set to something else by hand, or on a CUDA machine, where CPU tensors cannot reach a compiled kernel.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("recipe", ["minmax-w8a8", "dgq-w8a8", "mixed"])
def test_triton_target_matches_eager_quantized(recipe):
    """"mixed": W4A8 with one MLP at W8A8 and proj_out in float (tests/conftest.py), in one graph."""
    torch._dynamo.reset()
    model = build("pixart")
    calibration = calibration_set("pixart")
    qmodel = lowbit.quantize(model, Recipe.from_toml(MIXED_RECIPE) if recipe == "mixed" else recipe, calibration, progress=False)
    compiled = torch.compile(qmodel, backend="lowbit", options={"target": "triton"})
    kwargs = calibration[1][1]
    with torch.no_grad():
        out, eager, fp = compiled(**kwargs)[0], qmodel(**kwargs)[0], model(**kwargs)[0]
    # Same bound as the CPU target (tests/lowering/test_cpu_backend.py): a tenth of the
    # quantization error, since a float-rounding difference can flip one integer step.
    assert _relative(out, eager) < 0.1 * _relative(eager, fp)
    # every linear runs a Triton GEMM (DGQ's channel-grouped ones the group GEMM), and every
    # log2 attention (DGQ) the log2 kernel: this model's attention takes no mask
    report = compile_reports()[-1].translation
    ops = [n.target._opname for n in qmodel.graph_module.graph.nodes if n.target in (
        torch.ops.lowbit.quantized_linear.default, torch.ops.lowbit.quantized_attention.default)]
    expected = {"quantized_linear": ops.count("quantized_linear")}
    if recipe.startswith("dgq"):
        expected["quantized_attention"] = ops.count("quantized_attention")
    assert dict(report.lowered) == expected and not report.fallbacks


def test_var_dynamic_activations_run_the_fused_dynamic_kernel():
    """LiteVAR's per-token dynamic activations: every linear runs quantize_dynamic + the W8A8 GEMM."""
    from lowbit.ir.schema import QuantizedLinear, schema_class
    from lowbit.lowering.triton import TRITON_TRANSLATIONS, _dynamic_kernel
    from tests.conftest import small_var, var_calibration

    torch._dynamo.reset()
    var, tokenizer, step = small_var()
    calibration = var_calibration(var, tokenizer, step)
    qmodel = lowbit.quantize(step, "litevar-w8a8", calibration, step_arg="scale", progress=False)
    compiled = torch.compile(qmodel, backend="lowbit", options={"target": "triton"})
    kwargs = calibration[-1][1]
    with torch.no_grad():
        out, eager = compiled(**kwargs)[0], qmodel(**kwargs)[0]
    # the kernel computes the reference's ranges and codes exactly (tests/kernels); the GEMM sums exactly
    assert _relative(out, eager) < 1e-4
    report = compile_reports()[-1].translation
    assert report.lowered["quantized_linear"] == 12 and not report.fallbacks
    chosen = {TRITON_TRANSLATIONS[QuantizedLinear.overload()](n)[0] for n in qmodel.graph_module.graph.nodes
              if schema_class(n) is QuantizedLinear}
    assert chosen == {_dynamic_kernel}  # the fused range-and-codes kernel, not the static quantizer
