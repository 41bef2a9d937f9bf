from lowbit.cli import main


def test_quantize_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["quantize", "--prompts", "2", "--steps", "3", "--samples", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.csv", "report.json", "samples.png"]
    printed = capsys.readouterr().out
    assert "transformer_blocks.0.attn2.to_q" in printed and "pass convert_to_quantized_ops" in printed


def test_recipe_file_and_bad_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "mine"\nweight_bits = 3\nactivation_bits = 20\n')
    code = main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "activation_bits = 20 is outside [2, 16]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["recipes"]) == 0
    assert "minmax-w4a6" in capsys.readouterr().out
