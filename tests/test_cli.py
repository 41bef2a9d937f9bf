import json

import pytest

from lowbit.cli import main
from lowbit.recipes import get_recipe


def test_quantize_writes_all_outputs(tmp_path, capsys, mixed_recipe):
    out = tmp_path / "run"
    code = main(["quantize", "--recipe", str(mixed_recipe), "--prompts", "2", "--steps", "3", "--samples", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".lowbit-output", "model", "report.csv", "report.json", "samples.png"]
    printed = capsys.readouterr().out
    assert "recipe w4a8-mixed" in printed and "pass split_start_token" in printed and "pass convert_to_quantized_ops" in printed
    report = {row["layer"]: row for row in json.loads((out / "report.json").read_text())}
    assert report["transformer_blocks.0.ff.net.2"]["weight_bits"] == 8 and report["transformer_blocks.1.ff.net.2"]["weight_bits"] == 4
    assert report["proj_out"]["granularity"] == "float" and report["proj_out"]["set_by"] == 'layers."proj_out"'


def test_quantize_with_training_writes_its_curve_and_resumes(tmp_path, capsys):
    """A training recipe: checkpoints beside the output, the loss/bit-width picture inside it; run again,
    it resumes from the last checkpoint (no step left) and writes the same model."""
    path = tmp_path / "fraqat.toml"
    path.write_text(get_recipe("fraqat-w4a8").with_settings("train_quantized", qat_steps=6, checkpoint_every=3).to_toml())
    out = tmp_path / "run"
    command = ["quantize", "--recipe", str(path), "--prompts", "2", "--steps", "3", "--samples", "1", "--out", str(out)]
    assert main(command) == 0
    assert (out / "training.png").is_file() and "training.png" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run.checkpoints").iterdir()) == ["step-0000003.safetensors", "step-0000006.safetensors"]
    first = (out / "model" / "params.safetensors").read_bytes()
    assert main(command + ["--overwrite"]) == 0
    assert (out / "model" / "params.safetensors").read_bytes() == first


def test_recipe_file_and_bad_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "mine"\nweight_bits = 3\nactivation_bits = 20\n')
    code = main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert code == 2
    assert f"{recipe}: activation_bits = 20.0 is outside [2, 16]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["recipes"]) == 0
    assert "minmax-w4a6" in capsys.readouterr().out


def test_quantize_compares_like_with_like(tmp_path, capsys):
    """The full-precision and quantized pipeline runs start from the same noise: at W16A16 the two
    sample sets agree (they differed by 0.37 when both runs shared one consumed generator)."""
    assert main(["quantize", "--recipe", "minmax-w16a16", "--prompts", "1", "--steps", "3", "--samples", "2",
                 "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "relative L2 difference" in line)
    assert float(line.rsplit(":", 1)[1]) < 1e-3, line


def test_counts_below_one_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--samples", "0", "--out", str(tmp_path / "ev")])
    assert exit_.value.code == 2
    assert "argument --samples: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
