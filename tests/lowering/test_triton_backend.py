"""The "lowbit" backend's Triton target; without CUDA its kernels run in Triton's interpreter on CPU."""

import pytest
import torch

import lowbit
from lowbit.lowering.backend import compile_reports
from lowbit.models.tiny import build
from tests.conftest import calibration_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("recipe, kernels", [("minmax-w8a8", {"quantized_linear"}), ("dgq-w8a8", {"quantized_attention"})])
def test_triton_target_matches_eager_quantized(recipe, kernels):
    torch._dynamo.reset()
    model = build("pixart")
    calibration = calibration_set("pixart")
    qmodel = lowbit.quantize(model, recipe, calibration, progress=False)
    compiled = torch.compile(qmodel, backend="lowbit", options={"target": "triton"})
    kwargs = calibration[1][1]
    with torch.no_grad():
        out, eager, fp = compiled(**kwargs)[0], qmodel(**kwargs)[0], model(**kwargs)[0]
    # Same bound as the CPU target (tests/lowering/test_cpu_backend.py): a tenth of the
    # quantization error, since a float-rounding difference can flip one integer step.
    assert _relative(out, eager) < 0.1 * _relative(eager, fp)
    report = compile_reports()[-1].translation
    assert set(report.lowered) == kernels
    if recipe.startswith("dgq"):  # cross-attention carries the text mask, which the log2 kernel does not take
        assert {f.reason for f in report.fallbacks if f.op == "quantized_attention"} == {"attention mask: the log2 kernel takes none"}
