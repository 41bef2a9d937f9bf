"""Per-timestep scales: one HTP graph per timestep of the schedule, weights stored once in one
context binary, and a denoiser that runs the graph of the timestep it is called with."""

import json

import pytest
import torch

import lowbit
from lowbit.evaluation.run import calibrate_reference
from lowbit.lowering.onnx_qnn import HTPDenoiser, compile_context, export_schedule

from tests.lowering.onnx_qnn.conftest import fp_output

HTP_NOISE = 2.0  # as in test_reference_export.py


@pytest.fixture(scope="module")
def schedule(tmp_path_factory, reference):
    calibration = calibrate_reference(reference, prompts=1, steps=2, progress=False)
    qmodel = lowbit.quantize(reference, "minmax-w8a8", calibration, progress=False)
    folder = tmp_path_factory.mktemp("schedule")
    examples = {float(kw["timestep"][0]): kw for _, kw in calibration}
    results = export_schedule(qmodel, examples, folder, calibration=calibration)
    return calibration, qmodel, folder, results


def test_each_timestep_graph_matches_eager_at_its_timestep(schedule, reference):
    calibration, qmodel, folder, results = schedule
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(map(float, manifest["graphs"])) == sorted(r.timestep for r in results) and len(results) == 2
    denoiser = HTPDenoiser(folder)
    for _, kwargs in calibration:
        kw = {k: v for k, v in kwargs.items() if k != "return_dict"}
        htp = denoiser(**kw)[0]
        with torch.no_grad():
            eager = qmodel(**kw)[0]
        error = float((htp - eager).norm() / eager.norm())
        quantization_error = float((eager - fp_output(reference, kw)).norm() / eager.norm())
        assert error <= HTP_NOISE * quantization_error, (float(kw["timestep"][0]), error, quantization_error)
    with pytest.raises(ValueError, match="no exported graph for step 123"):
        denoiser(**{**kw, "timestep": torch.full((2,), 123.0)})


def test_one_context_binary_stores_the_shared_weights_once(schedule, tmp_path):
    _, _, _, results = schedule
    compile_context([results[0].path], tmp_path / "one")
    both = compile_context([r.path for r in results], tmp_path / "both")
    assert [p.name for p in both] == [f"{r.path.stem}_ctx.onnx" for r in results]
    one_bin = sum(p.stat().st_size for p in (tmp_path / "one").glob("*.bin"))
    bins = list((tmp_path / "both").glob("*.bin"))
    assert len(bins) == 1  # every EPContext model points to this one binary
    # Unshared, two graphs would take two full binaries; measured, the second graph adds a third of one
    # (its own constants, biases at its input scales, and the graph) while the int8 weights are shared.
    assert bins[0].stat().st_size < 1.6 * one_bin, (bins[0].stat().st_size, one_bin)
