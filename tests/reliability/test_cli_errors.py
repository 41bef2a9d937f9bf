"""Bad input to the command line ends in one line on stderr naming the file and what to do, exit
code 2, and nothing written: never a traceback."""

import json

import onnx
from onnx import TensorProto, helper

from lowbit.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_verify_qnn_refuses_a_text_file(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    assert main(["verify-qnn", str(path)]) == 2
    assert "is not an ONNX model" in _one_error_line(capsys)


def test_verify_qnn_refuses_an_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert main(["verify-qnn", str(path)]) == 2
    assert "holds no graph" in _one_error_line(capsys)


def test_verify_qnn_names_a_manifest_model_it_does_not_know(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "t0.onnx"))
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "sd9", "graphs": {"0": "t0.onnx"}}))
    assert main(["verify-qnn", str(tmp_path / "t0.onnx")]) == 2
    assert "names the model 'sd9'" in _one_error_line(capsys)


def test_an_output_path_below_a_file_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    assert main(["quantize", "--out", str(blocker / "run")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert blocker.read_text() == "keep me"

