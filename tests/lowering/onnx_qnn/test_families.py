"""Small configs of PixArt, Sana, SD3, the SD-1.x and SDXL UNets and FLUX export and load on the
QNN HTP with no CPU fallback and no float island, and compute what eager does."""

import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import lowbit
from lowbit.ir.capture import normalize_inputs
from lowbit.lowering.onnx_qnn.placement import cpu_nodes
from lowbit.lowering.onnx_qnn.specialize import flat_inputs
from lowbit.models.tiny import build
from tests.conftest import calibration_set

# Same tolerance and reason as for the reference model (test_reference_export.py).
HTP_NOISE = 2.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each family quantized (minmax-w8a8) and exported once for both tests below."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = build(name)
            calibration = calibration_set(name)
            qmodel = lowbit.quantize(model, "minmax-w8a8", calibration, progress=False)
            args, kwargs = calibration[1]
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            cache[name] = model, calibration, qmodel, lowbit.export_onnx(qmodel, args, kwargs, path, calibration=calibration)
        return cache[name]
    return get


def _integer_weight_bytes(path) -> int:
    """Bytes of the graph's 8-bit initializers: the quantized weights (and zero points)."""
    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).size for t in model.graph.initializer
               if t.data_type in (TensorProto.INT8, TensorProto.UINT8))


@pytest.mark.parametrize("name", ["pixart", "sana", "sd3", "flux",
                                  "sd-unet", "sdxl-unet"])
def test_family_exports_and_runs_on_the_htp(exported, name):
    model, calibration, qmodel, result = exported(name)
    args, kwargs = calibration[1]
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
def test_unet_loads_with_every_op_on_the_htp(exported, tmp_path, name):
    _, _, _, result = exported(name)
    report = lowbit.verify_qnn(result.path, context_dir=tmp_path)
    # loads with CPU fallback disabled, and the QNN graph it built has no float op
    assert report.ok, "\n".join(report.lines())
    # counted apart from that load: onnxruntime's record of which provider takes each node, in a
    # session that may fall back to the CPU (a fallback option that stopped being honoured would
    # let the load above pass with CPU nodes)
    assert cpu_nodes(result.path) == []
    # the context binary a phone loads was written and holds the graph: at least one byte per
    # integer weight (measured: 1.41 MB for sd-unet's 0.71 MB of int8 initializers)
    assert report.context is not None and report.context.is_file()
    weights = _integer_weight_bytes(result.path)
    assert report.context_bytes >= weights > 0, (report.context_bytes, weights)
