"""Recipes as data: the built-in TOML files, per-layer tables, pass lists, strict checking."""

import pytest

import lowbit
from lowbit.models.tiny import build
from lowbit.passes import PassError
from lowbit.recipes import Recipe, RecipeError, get_recipe
from lowbit.recipes.builtin import BUILTIN


def test_builtin_names_resolve_to_their_files():
    names = lowbit.recipes()
    for w in (4, 6, 8, 16):
        for a in (4, 6, 8, 16):
            assert f"minmax-w{w}a{a}" in names
    r = get_recipe("minmax-w4a6")
    assert (r.precision.weight_bits, r.precision.activation_bits) == (4, 6)
    assert r.passes == Recipe.from_file(BUILTIN / "minmax.toml").passes
    dgq = get_recipe("dgq-w4a6-g16")
    assert dict(next(s for s in dgq.passes if s.name == "group_activations").settings) == {"groups": 16}
    assert [s.name for s in get_recipe("adaround-w4a8").passes][3:5] == ["choose_quant_params", "reconstruct_weights"]


def test_auto_variant_chooses_the_attention_scheme_at_calibration():
    auto = get_recipe("dgq-w4a6-auto")
    assert "dgq-w4a6-auto" in lowbit.recipes() and auto.precision.attention_scheme == "auto"
    names = [s.name for s in auto.passes]
    assert names.index("insert_observers") + 1 == names.index("choose_attention_scheme") < names.index("choose_quant_params")
    assert Recipe.from_toml(auto.to_toml()) == auto
    with pytest.raises(RecipeError, match="leaves in floating point"):
        get_recipe("litevar-w4a8-auto")  # LiteVAR does not quantize the probabilities
    text = BASE + 'attention_scheme = "auto"\n[[passes]]\nname = "canonicalize_attention"\n[[passes]]\nname = "annotate_quantization"\n'
    with pytest.raises(RecipeError, match="lists no choose_attention_scheme pass"):
        Recipe.from_toml(text)


def test_toml_round_trip_with_layers_and_passes():
    r = Recipe.build("mine", 5.5, 8, attention_bits=16, layers={"proj_out": {"float": True}, "*.ff.*": {"weight_bits": 8}})
    r = r.with_pass("choose_quant_params", weight_range="mse").with_pass("split_start_token")
    again = Recipe.from_toml(r.to_toml())
    assert again == r
    assert [o.pattern for o in again.precision.layers] == ["proj_out", "*.ff.*"]


BASE = 'name = "x"\nweight_bits = 8\nactivation_bits = 8\n'


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nweight_bits = 1\nactivation_bits = 8', r"weight_bits = 1.0 is outside \[2, 16\]"),
    (BASE + 'granularity = "pixel"', r"unknown recipe field\(s\) \['granularity'\]"),
    (BASE + "version = 7", "has version 7"),
    ('name = "x"\nweight_bits = 8', "needs at least"),
    ('name = "x" weight_bits', "not valid TOML"),
    (BASE + 'quantize_attention = "false"', r"quantize_attention = 'false' must be true or false"),
    (BASE.replace("= 8\nact", '= "8"\nact'), r"weight_bits = '8' must be a number"),
    (BASE + '[layers."a"]\nbits = 4', r'layers."a" has unknown field\(s\) \[\'bits\'\]'),
    (BASE + '[layers."a"]\nfloat = "yes"', r'layers."a".float = \'yes\' must be true or false'),
    (BASE + '[[passes]]\nname = "canonicalize_attention"\n[[passes]]\nname = "anotate_quantization"',
     "unknown pass 'anotate_quantization'; did you mean annotate_quantization"),
    (BASE + '[[passes]]\nname = "canonicalize_attention"\n[[passes]]\nname = "annotate_quantization"\n'
     '[[passes]]\nname = "insert_observers"\n[[passes]]\nname = "choose_quant_params"\nweight_range = "p99"',
     r"choose_quant_params.weight_range = 'p99' must be 'minmax' or 'mse'"),
    (BASE + '[[passes]]\nname = "canonicalize_attention"\n[[passes]]\nname = "annotate_quantization"\n'
     '[[passes]]\nname = "insert_observers"\n[[passes]]\nname = "choose_quant_params"\n[[passes]]\nname = "split_start_token"',
     r"pass 'split_start_token' must run before \['choose_quant_params'\]"),
    (BASE + '[[passes]]\nname = "canonicalize_attention"\n[[passes]]\nname = "insert_observers"',
     r"pass 'insert_observers' requires \['annotate_quantization'\]"),
])
def test_invalid_recipes_are_refused_by_name(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(text, "my.toml")


def test_unknown_name_and_unmatched_pattern(calib):
    with pytest.raises(RecipeError, match="unknown recipe 'minimax-w8a8'; built-in recipes are <method>-w<W>a<A>"):
        get_recipe("minimax-w8a8")
    with pytest.raises(RecipeError, match="-g<K> sets the groups of group_activations, which minmax does not run"):
        get_recipe("minmax-w8a8-g4")
    recipe = Recipe.build("x", 8, 8, layers={"transformer_blocks.9.*": {"float": True}})
    with pytest.raises(PassError, match=r'layers."transformer_blocks.9.\*" matches no layer.*close layer names: transformer_blocks'):
        lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)


def test_a_toml_file_runs_through_quantize(calib, tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text(BASE + '[layers."*.attn2.*"]\nfloat = true\n[layers."*.ff.*"]\nweight_bits = 4\n')
    qmodel = lowbit.quantize(build("pixart"), path, calib("pixart"), progress=False)
    assert not any(".attn2." in t for t in qmodel.params)
    assert qmodel.params["transformer_blocks.0.ff.net.2:weight"].spec.bits == 4
    assert qmodel.params["transformer_blocks.0.attn1.to_q:weight"].spec.bits == 8


def test_with_settings_changes_some_settings_of_a_pass_and_keeps_the_rest():
    recipe = get_recipe("fraqat-w4a8").with_settings("train_quantized", qat_steps=7)
    settings = dict(next(s for s in recipe.passes if s.name == "train_quantized").settings)
    assert settings["qat_steps"] == 7 and settings["qat_schedule"][-1] == [0, 14]  # the schedule kept
    with pytest.raises(RecipeError, match="runs no pass 'train_quantized'"):
        get_recipe("minmax-w8a8").with_settings("train_quantized", qat_steps=7)


def test_mdwa_recipes_alone_and_composed():
    alone = get_recipe("mdwa-0.95")
    assert [s.name for s in alone.passes] == ["canonicalize_attention", "annotate_quantization", "insert_window_observers",
                                              "choose_attention_windows", "convert_to_quantized_ops"]
    assert dict(alone.passes[3].settings) == {"ratio": 0.95}
    assert alone.precision.resolve("blocks.0.attn.proj").keep_float  # nothing quantized
    composed = get_recipe("litevar-w4a8-mdwa0.9")
    names = [s.name for s in composed.passes]
    assert names.index("insert_window_observers") < names.index("choose_attention_windows") < names.index("convert_to_quantized_ops")
    assert composed.precision.weight_bits == 4 and dict(composed.passes[names.index("choose_attention_windows")].settings) == {"ratio": 0.9}
    with pytest.raises(RecipeError, match="R0 must be in"):
        get_recipe("mdwa-1.5")
    assert {"mdwa-1", "mdwa-0.95", "mdwa-0.6", "mdwa2d-0.95"} <= set(lowbit.recipes())
    assert dict(alone.passes[2].settings) == {}  # LiteVAR's band on flattened indices
    for name in ("mdwa2d-0.95", "minmax-w8a8-mdwa2d0.95"):  # square windows on each 2-D token grid
        grid = get_recipe(name)
        observe = next(s for s in grid.passes if s.name == "insert_window_observers")
        assert dict(observe.settings) == {"geometry": "grid"}, name
    deployed = get_recipe("litevar-w4a8-mp")  # LiteVAR's composition: MDWA 0.95 + ASC + W4A8 with ffn.fc2 in fp
    settings = {s.name: dict(s.settings) for s in deployed.passes}
    assert settings["choose_attention_windows"] == {"ratio": 0.95} and settings["choose_cfg_sharing"] == {}
    assert deployed.precision.resolve("blocks.3.ffn.fc2").keep_float and not deployed.precision.resolve("blocks.3.ffn.fc1").keep_float
    assert "litevar-w4a8-mp" in lowbit.recipes()
