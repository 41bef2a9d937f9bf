"""The shipped reference model, quantized with the minmax and DGQ recipes at W8A8, W8A16 and W4A8,
exports, loads on the QNN HTP (v79, SoC 69) with CPU fallback disabled, runs every op on integer
grids (no float island), and matches lowbit's eager quantized module."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import lowbit
from lowbit.lowering.onnx_qnn.htp import float_weight_bits
from lowbit.lowering.onnx_qnn.quantizers import QUANTIZER_KEY

from tests.lowering.onnx_qnn.conftest import fp_output

RECIPES = ["minmax-w8a8", "minmax-w8a16", "minmax-w4a8", "dgq-w8a8", "dgq-w8a16", "dgq-w4a8", "uniform-dynamic-w8a8"]

# Tolerance: ||HTP - eager|| <= 2 x ||eager - FP||. eager - FP is one round of lowbit's quantization;
# the HTP requantizes every tensor in fixed point, one step off float rounding near rounding
# boundaries, and each such flip moves an 8-bit tensor by a full step, so the HTP may add about
# one more quantization's worth of error, not more. Measured ratios: 0.10 (W4A8) to 0.97 (W8A8);
# onnxruntime's CPU running the very same graph already differs from eager by 0.75x (W8A8). A
# broken mapping (a wrong grid, a float island, a layout bug) gives ratios of 10-200.
HTP_NOISE = 2.0


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", RECIPES)
def test_reference_recipe_runs_on_the_htp_like_eager(tmp_path, name, quantized, reference, reference_calibration):
    qmodel = quantized(name)
    args, kwargs = reference_calibration[0]
    result = lowbit.export_onnx(qmodel, args, kwargs, tmp_path / "model.onnx", calibration=reference_calibration)
    model = onnx.load(str(result.path))
    inputs = {i.name: kwargs[i.name] for i in model.graph.input}
    report = lowbit.verify_qnn(result.path, inputs, qmodel, context_dir=tmp_path / "context")
    assert report.ok, "\n".join(report.lines())
    assert report.context_bytes > 0  # the EPContext binary a phone loads
    with torch.no_grad():
        eager = qmodel(**kwargs)[0]
    quantization_error = _relative(eager, fp_output(reference, kwargs))
    assert report.relative_error <= HTP_NOISE * quantization_error, (report.relative_error, quantization_error)

    # lowbit's quantizers keep their own widths, and 4-bit weights go in as ONNX INT4
    bits = qmodel.recipe.precision.activation_bits
    zero_points = {i.name: i for i in model.graph.initializer}
    lowbit_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in zero_points
                and any(p.key == QUANTIZER_KEY for p in n.metadata_props) and "log2" not in n.output[0]]
    assert lowbit_q
    want = TensorProto.UINT8 if bits <= 8 else TensorProto.UINT16
    assert {zero_points[n.input[2]].data_type for n in lowbit_q} == {want}
    int4 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT4]
    assert (len(int4) > 0) == (qmodel.recipe.precision.weight_bits <= 4)


def test_other_socs_are_targets_and_an_older_htp_names_what_it_cannot_take(tmp_path, quantized, reference, reference_calibration):
    qmodel = quantized("minmax-w8a8")
    args, kwargs = reference_calibration[0]
    path = lowbit.export_onnx(qmodel, args, kwargs, tmp_path / "model.onnx", calibration=reference_calibration).path
    for soc, htp in (("sm8550", "v73, SoC 43"), ("sm8650", "v75, SoC 57"), ("sm8850", "v81, SoC 87")):  # 8 Gen 2, 8 Gen 3, 8 Elite Gen 5
        report = lowbit.verify_qnn(path, soc=soc)
        assert report.ok and f"{soc} ({htp})" in report.lines()[0], report.lines()
    # Snapdragon 8 Gen 1, HTP v69 (measured): the first and last layers, which the recipe keeps at
    # 16-bit weights, stay on the CPU; the report names each node with the lowbit layer it came from
    gen1 = lowbit.verify_qnn(path, soc="sm8450")
    assert not gen1.ok and "does NOT load on the HTP of sm8450 (v69, SoC 36)" in gen1.lines()[0]
    assert {m.layer for m in gen1.misplaced} == {"pos_embed.proj", "proj_out"}
    assert {m.op for m in gen1.misplaced} >= {"Gemm"} and {m.where for m in gen1.misplaced} == {"cpu"}
    # ... and with those layers at 8-bit weights (what `lowbit export --soc sm8450` does) the model runs whole there
    assert float_weight_bits("sm8450") == 8 and float_weight_bits("sm8750") == 16
    path8 = lowbit.export_onnx(qmodel, args, kwargs, tmp_path / "model8.onnx", calibration=reference_calibration,
                               fp_weight_bits=8).path
    inputs = {i.name: kwargs[i.name] for i in onnx.load(str(path8)).graph.input}
    whole = lowbit.verify_qnn(path8, inputs, qmodel, context_dir=tmp_path / "context8", soc="sm8450")
    assert whole.ok, "\n".join(whole.lines())
    with torch.no_grad():
        quantization_error = _relative(qmodel(**kwargs)[0], fp_output(reference, kwargs))
    assert whole.relative_error <= HTP_NOISE * quantization_error, (whole.relative_error, quantization_error)
    with pytest.raises(ValueError, match="unknown SoC 'sm8999'; lowbit knows sm8450"):
        lowbit.verify_qnn(path, soc="sm8999")
