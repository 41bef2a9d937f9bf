"""``lowbit export --target qnn-htp`` writes the graphs, the shared EPContext binary and what
``lowbit verify-qnn`` needs to compare a graph with lowbit's eager module."""

import json

import onnx
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.lowering.onnx_qnn.quantizers import QUANTIZER_KEY

W8A16_LAYER = "transformer_blocks.1.attn1.to_out.0"


def test_export_then_verify(tmp_path, capsys, mixed_recipe):
    """A TOML recipe (pass list, per-layer tables: W4A8, one MLP at W8A8, one projection at W8A16,
    proj_out in float, i.e. fp16 on the HTP) all the way to the HTP; verify-qnn reloads the saved
    quantized model to compare against, with CPU fallback disabled."""
    mixed_recipe.write_text(mixed_recipe.read_text() + f'\n[layers."{W8A16_LAYER}"]\nweight_bits = 8\nactivation_bits = 16\n')
    out = tmp_path / "qnn"
    assert main(["export", "--target", "qnn-htp", "--model", "pixart", "--recipe", str(mixed_recipe),
                 "--steps", "2", "--prompts", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "pixart" and len(manifest["graphs"]) == 2 and manifest["batch"] == 2
    assert len(list((out / "context").glob("*.bin"))) == 1 and len(list((out / "context").glob("*_ctx.onnx"))) == 2
    graph = out / next(iter(manifest["graphs"].values()))
    model = onnx.load(graph)
    zero_points = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    input_quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                        and any(p.key == QUANTIZER_KEY and p.value == f"{W8A16_LAYER}:input" for p in n.metadata_props)]
    assert input_quantizers and all(str(zero_points[n.input[2]].dtype) == "uint16" for n in input_quantizers)
    capsys.readouterr()
    assert main(["verify-qnn", str(graph)]) == 0
    printed = capsys.readouterr().out
    assert "with CPU fallback disabled" in printed and "relative L2 error against lowbit's eager quantized module" in printed
    assert (out / "verify" / f"{graph.stem}_ctx.onnx").is_file()


def test_export_refuses_an_odd_batch(tmp_path, capsys):
    assert main(["export", "--model", "pixart", "--batch", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--batch must be an even number" in capsys.readouterr().err


def test_export_for_the_snapdragon_8_gen_1_runs_whole_there(tmp_path, capsys):
    """v69 has no 16-bit weights: the export for sm8450 gives the layers kept in full precision 8-bit ones,
    and verify-qnn (on the SoC the manifest names) loads every node on that HTP."""
    out = tmp_path / "qnn"
    assert main(["export", "--model", "reference", "--soc", "sm8450", "--steps", "1", "--prompts", "1", "--out", str(out)]) == 0
    assert "takes no 16-bit weights" in capsys.readouterr().out
    graph = out / next(iter(json.loads((out / "manifest.json").read_text())["graphs"].values()))
    assert main(["verify-qnn", str(graph)]) == 0
    assert "loads on the HTP of sm8450 (v69, SoC 36) with CPU fallback disabled" in capsys.readouterr().out
