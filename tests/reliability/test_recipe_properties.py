"""Property: any recipe TOML either reads to a valid recipe (which writes back to itself) or is
refused with a RecipeError naming the file and a field, never another exception.

Each example is a valid table (every Precision field drawn from its type, layer tables, extra
passes with typed settings at any position) with up to two faults anywhere in it: a value of any
TOML type, a missing field, an unknown field. A single fault reaches the deep checks (types, bit
ranges, pass settings, pass order) instead of stopping at the first of many; about 40% of the
examples are valid and must write back to themselves.
"""

from __future__ import annotations

import string
import typing

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.ir.precision import Precision
from lowbit.passes import PASSES
from lowbit.passes.registry import pass_settings
from lowbit.recipes import Recipe, RecipeError
from lowbit.recipes.recipe import _LAYER_FIELDS, STANDARD_PASSES

SOURCE = "fuzzed.toml"
PROPERTIES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_names = st.text(string.ascii_letters + "_.*", min_size=1, max_size=12)
_scalars = st.one_of(st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=8))
_any = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3),
                    max_leaves=6)
_bits = st.sampled_from([2, 3, 4, 4.5, 6, 8, 16])
_PRECISION_VALUES = {k: st.from_type(hint) for k, hint in typing.get_type_hints(Precision).items() if k != "layers"}
_PRECISION_VALUES |= {k: _bits for k in ("weight_bits", "activation_bits", "attention_bits", "qkv_bits")}


@st.composite
def _valid_table(draw) -> dict:
    """A recipe table that is meant to be valid (the pass order may still be refused)."""
    data = {"name": draw(_names), "weight_bits": draw(_bits), "activation_bits": draw(_bits)}
    for key in draw(st.lists(st.sampled_from(sorted(_PRECISION_VALUES)), max_size=4, unique=True)):
        data[key] = draw(_PRECISION_VALUES[key])
    layers = draw(st.dictionaries(_names, st.fixed_dictionaries({}, optional={
        **{k: _bits for k in _LAYER_FIELDS if k != "float"}, "float": st.booleans()}).filter(bool), max_size=3))
    if layers:
        data["layers"] = layers
    passes = [s.to_dict() for s in STANDARD_PASSES]
    for name in draw(st.lists(st.sampled_from(sorted(set(PASSES) - {s.name for s in STANDARD_PASSES})), max_size=2)):
        settings_ = draw(st.fixed_dictionaries({}, optional={k: st.from_type(hint) for k, (hint, _) in pass_settings(name).items()}))
        passes.insert(draw(st.integers(0, len(passes))), {"name": name, **settings_})
    if passes != [s.to_dict() for s in STANDARD_PASSES] or draw(st.booleans()):
        data["passes"] = passes
    return data


def _tables_in(data: dict) -> list[dict]:
    """The recipe table and every table nested in it (layer tables, pass tables)."""
    out = [data]
    for value in data.values():
        out += [v for v in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else [])
                if isinstance(v, dict)]
    return out


@st.composite
def recipe_tables(draw) -> dict:
    """A valid table, half the time with one or two faults: a value of another type, a missing
    field, an unknown field."""
    data = draw(_valid_table())
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        table = draw(st.sampled_from(_tables_in(data)))
        fault = draw(st.sampled_from(["value", "missing", "unknown"]))
        if fault == "unknown" or not table:
            table[draw(_names)] = draw(_any)
        elif fault == "value":
            table[draw(st.sampled_from(sorted(table)))] = draw(_any)
        else:
            del table[draw(st.sampled_from(sorted(table)))]
    return data


def _keys(value) -> set[str]:
    """Every key and pass name anywhere in the table: a refusal must name one of them."""
    if isinstance(value, dict):
        return set(map(str, value)) | set().union(*map(_keys, value.values()))
    if isinstance(value, list):
        return set().union(*map(_keys, value)) | {v["name"] for v in value if isinstance(v, dict) and isinstance(v.get("name"), str)}
    return set()


def _read(text: str) -> Recipe | RecipeError:
    """The recipe, or the refusal; any other exception fails the test."""
    try:
        return Recipe.from_toml(text, SOURCE)
    except RecipeError as err:
        assert str(err).startswith(SOURCE) and "\n" not in str(err).strip(), str(err)
        return err


@PROPERTIES
@given(recipe_tables())
def test_any_recipe_table_reads_or_is_refused_by_field(data):
    result = _read(tomli_w.dumps(data))
    if isinstance(result, RecipeError):
        named = _keys(data) | {"name", "weight_bits", "activation_bits", "passes"}
        assert any(k in str(result) for k in named), str(result)
    else:
        assert Recipe.from_toml(result.to_toml(), SOURCE) == result


@PROPERTIES
@given(st.text(max_size=200))
def test_any_text_reads_or_is_refused(text):
    _read(text)
