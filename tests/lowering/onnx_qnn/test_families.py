"""Small configs of PixArt, Sana, SD3, the SD-1.x and SDXL UNets and FLUX export and load on the
QNN HTP with no CPU fallback and no float island; the transformers also compute what eager does."""

import numpy as np
import onnx
import pytest
import torch

import lowbit
from lowbit.ir.capture import normalize_inputs
from lowbit.lowering.onnx_qnn.specialize import flat_inputs
from lowbit.models.tiny import build
from tests.conftest import calibration_set

# Same tolerance and reason as for the reference model (test_reference_export.py).
HTP_NOISE = 2.0
UNET_NUMERICS = pytest.mark.xfail(strict=True, reason=(
    "the UNets load and run every op on the HTP, but their output is wrong (relative error ~1.1): the HTP "
    "computes the first quantized 3x3 conv right alone and wrong inside the graph; not resolved yet"))


@pytest.mark.parametrize("name", ["pixart", "sana", "sd3", "flux",
                                  pytest.param("sd-unet", marks=UNET_NUMERICS), pytest.param("sdxl-unet", marks=UNET_NUMERICS)])
def test_family_exports_and_runs_on_the_htp(tmp_path, name):
    model = build(name)
    calibration = calibration_set(name)
    qmodel = lowbit.quantize(model, "minmax-w8a8", calibration, progress=False)
    args, kwargs = calibration[1]
    result = lowbit.export_onnx(qmodel, args, kwargs, tmp_path / f"{name}.onnx", calibration=calibration)
    flat = flat_inputs(qmodel.graph_module, normalize_inputs(model, args, kwargs, "timestep"))
    inputs = {i.name: flat[i.name] for i in onnx.load(str(result.path)).graph.input}
    with torch.no_grad():
        eager = qmodel(*args, **kwargs, return_dict=False)[0]
        fp = model(*args, **kwargs, return_dict=False)[0]
    report = lowbit.verify_qnn(result.path, inputs, eager)
    assert report.ok, "\n".join(report.lines())
    quantization_error = float((eager - fp).norm() / fp.norm())
    assert report.relative_error <= HTP_NOISE * quantization_error, (report.relative_error, quantization_error)


@pytest.mark.parametrize("name", ["sd-unet", "sdxl-unet"])
def test_unet_loads_with_every_op_on_the_htp(tmp_path, name):
    model = build(name)
    calibration = calibration_set(name)
    qmodel = lowbit.quantize(model, "minmax-w8a8", calibration, progress=False)
    result = lowbit.export_onnx(qmodel, *calibration[1], tmp_path / f"{name}.onnx", calibration=calibration)
    report = lowbit.verify_qnn(result.path)
    assert report.ok, "\n".join(report.lines())
    assert np.isfinite(report.context_bytes)
