import pytest

import lowbit
from lowbit.models.tiny import build
from lowbit.recipes import Recipe, RecipeError, get_recipe


def test_builtin_names():
    names = lowbit.recipes()
    for w in (4, 6, 8, 16):
        for a in (4, 6, 8, 16):
            assert f"minmax-w{w}a{a}" in names
    r = get_recipe("minmax-w4a6")
    assert (r.weight_bits, r.activation_bits, r.weight_range) == (4, 6, "minmax")


def test_toml_round_trip():
    r = Recipe("mine", 5.5, 8, weight_range="mse", keep_fp=("proj_out", "*.attn2.*"), attention_bits=16)
    assert Recipe.from_toml(r.to_toml()) == r


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nweight_bits = 1\nactivation_bits = 8', r"weight_bits = 1 is outside \[2, 16\]"),
    ('name = "x"\nweight_bits = 8\nactivation_bits = 8\nweight_range = "p99"', "weight_range must be"),
    ('name = "x"\nweight_bits = 8\nactivation_bits = 8\ngranularity = "pixel"', r"unknown recipe field\(s\) \['granularity'\]"),
    ('name = "x"\nweight_bits = 8\nactivation_bits = 8\nversion = 7', "has version 7"),
    ('name = "x"\nweight_bits = 8', "needs at least"),
    ('name = "x" weight_bits', "not valid TOML"),
])
def test_invalid_recipes(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(text)


def test_unknown_name_and_unmatched_pattern(calib):
    with pytest.raises(RecipeError, match="unknown recipe 'minmax-w3a3'; built-in recipes include minmax-"):
        get_recipe("minmax-w3a3")
    recipe = Recipe("x", 8, 8, keep_fp=("transformer_blocks.9.*",))
    with pytest.raises(lowbit.passes.base.PassError, match=r"'transformer_blocks.9.\*' matches no layer"):
        lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)


def test_keep_fp_keeps_layers_in_full_precision(calib):
    recipe = Recipe("x", 8, 8, keep_fp=("*.attn2.*",))
    qmodel = lowbit.quantize(build("pixart"), recipe, calib("pixart"), progress=False)
    assert not any(".attn2." in t for t in qmodel.params)
    assert any(".attn1." in t for t in qmodel.params)
