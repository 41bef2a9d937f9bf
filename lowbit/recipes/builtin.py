"""The built-in recipes: the TOML files in ``builtin/``, one per method, instantiated by name.

``<method>-w<W>a<A>`` is ``builtin/<method>.toml`` at W-bit weights and A-bit activations (any
bit-widths in [2, 16]); ``-g<K>`` sets ``group_activations.groups`` for methods that group, and
``-qkv<B>`` the attention's Q, K and V bits (LiteVAR's third column), ``-mdwa<R0>`` adds LiteVAR's
multi-diagonal attention windows at ratio R0 (``choose_attention_windows``; ``-mdwa2d<R0>``: square
windows on each scale's or image's 2-D token grid instead of bands on flattened indices), ``-asc`` its attention
sharing across CFG in every layer (``-asc<δ>``: where the halves differ by at most δ, relative L1;
``choose_cfg_sharing``), ``-mp`` is LiteVAR's deployed composition (its mixed precision — the
``ffn.fc2`` layers its Fig. 5 found sensitive, in floating point — with MDWA at R0 = 0.95 and ASC
unless the name sets them: ``litevar-w4a8-mp``; ``lowbit sensitivity`` finds a model's own layers
instead), and ``-auto`` lets calibration choose each attention layer's probability
quantizer (``choose_attention_scheme``). ``mdwa-<R0>``, ``mdwa2d-<R0>``, ``asc``, ``asc-<δ>`` and
``mdwa-<R0>-asc`` are those attention savings alone, every layer in floating point.
``lowbit recipes --show NAME`` prints the resolved recipe, so a user reads exactly what it runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from functools import cache
from pathlib import Path

from lowbit.ir.precision import LayerOverride, Precision
from lowbit.recipes.recipe import STANDARD_PASSES, Recipe, RecipeError

__all__ = ["LITEVAR_ROWS", "MDWA_RATIOS", "get_recipe", "litevar_name", "recipes"]

BUILTIN = Path(__file__).parent / "builtin"
_NAME = re.compile(r"(?P<method>[a-z0-9]+(?:-[a-z]+)*)-w(?P<w>\d+(?:\.\d+)?)a(?P<a>\d+(?:\.\d+)?)(?:-g(?P<g>\d+))?(?:-qkv(?P<qkv>\d+(?:\.\d+)?))?(?:-mdwa(?P<grid>2d)?(?P<mdwa>\d+(?:\.\d+)?))?(?P<asc>-asc(?P<asc_threshold>\d+(?:\.\d+)?)?)?(?P<mp>-mp)?(?P<auto>-auto)?")
_ATTENTION_ONLY = re.compile(r"mdwa(?P<grid>2d)?-(?P<mdwa>\d+(?:\.\d+)?)(?P<asc>-asc(?:-(?P<asc_threshold>\d+(?:\.\d+)?))?)?|(?P<asc_only>asc)(?:-(?P<asc_only_threshold>\d+(?:\.\d+)?))?")
# the names listed by lowbit.recipes(): the bit-widths the project's tables use
_LISTED = {"minmax": ((4, 6, 8, 16), (4, 6, 8, 16)), "mse": ((4, 6, 8, 16), (4, 6, 8, 16)),
           "adaround": ((4, 6, 8, 16), (4, 6, 8, 16)), "dgq": ((4, 8), (6, 8)),
           **{m: ((3, 4), (6, 8)) for m in ("fraqat", "qat", "qat-int", "qat-halving")}}
# LiteVAR Tables 2 and 4: W/A/QKV
LITEVAR_ROWS = ((16, 16, 16), (8, 8, 16), (8, 8, 8), (4, 8, 8), (6, 6, 8), (4, 6, 8), (4, 4, 8))
_LISTED_GROUPS = (1, 2, 4, 8, 16)
MDWA_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)  # LiteVAR Table 1's R0
LITEVAR_RATIO = "0.95"  # the R0 LiteVAR deploys
LITEVAR_SENSITIVE = "*ffn.fc2"  # the layers LiteVAR's Fig. 5 found to bottleneck W4A8, kept in fp16


@cache
def _method(method: str) -> Recipe:
    return Recipe.from_file(BUILTIN / f"{method}.toml")


def _methods() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.toml"))


def _with_attention(recipe: Recipe, ratio: str | None, grid: bool, share: bool, threshold: str | None) -> Recipe:
    """``recipe`` with MDWA at R0 = ``ratio`` (None: no windows; ``grid``: 2-D windows) and ASC
    (``share``; ``threshold``: the relative L1 difference under which a layer shares, None: every
    layer as LiteVAR)."""
    if ratio is not None:
        if not 0.0 < float(ratio) <= 1.0:
            raise RecipeError(f"unknown recipe {recipe.name!r}: the MDWA ratio R0 must be in (0, 1], got {ratio}")
        observe = {"geometry": "grid"} if grid else {}
        recipe = recipe.with_pass("insert_window_observers", **observe).with_pass("choose_attention_windows", ratio=float(ratio))
    if share:
        settings = {} if threshold is None else {"threshold": float(threshold)}
        recipe = recipe.with_pass("insert_cfg_observers").with_pass("choose_cfg_sharing", **settings)
    return recipe


def _attention_only(name: str, match: re.Match) -> Recipe:
    """LiteVAR's MDWA and/or ASC with nothing quantized: every layer kept in floating point."""
    precision = Precision(weight_bits=16, activation_bits=16, layers=(LayerOverride("*", keep_float=True),))
    recipe = Recipe(name, precision, STANDARD_PASSES[:2] + STANDARD_PASSES[-1:],
                    description="LiteVAR's attention savings (MDWA windows, ASC CFG sharing), no quantization")
    return _with_attention(recipe, match["mdwa"], bool(match["grid"]), bool(match["asc"] or match["asc_only"]),
                           match["asc_threshold"] or match["asc_only_threshold"])


def _instantiate(name: str) -> Recipe:
    attention_only = _ATTENTION_ONLY.fullmatch(name)
    if attention_only is not None:
        return _attention_only(name, attention_only)
    match = _NAME.fullmatch(name)
    if match is None or match["method"] not in _methods():
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes are <method>-w<W>a<A> with method one of "
                          f"{', '.join(_methods())} (e.g. minmax-w8a8, dgq-w4a6-g16, litevar-w4a8-mdwa0.95; see lowbit.recipes()), "
                          f"mdwa-<R0>, mdwa2d-<R0>, asc or mdwa-<R0>-asc for LiteVAR's attention savings alone, "
                          f"or give the path of a .toml recipe file")
    base = _method(match["method"])
    bits = {"weight_bits": float(match["w"]), "activation_bits": float(match["a"])}
    if match["qkv"] is not None:
        bits["qkv_bits"] = float(match["qkv"])
    recipe = dataclasses.replace(base, name=name, precision=dataclasses.replace(base.precision, **bits))
    if match["g"] is not None:
        if not any(s.name == "group_activations" for s in recipe.passes):
            raise RecipeError(f"unknown recipe {name!r}: -g<K> sets the groups of group_activations, which "
                              f"{match['method']} does not run")
        recipe = recipe.with_settings("group_activations", groups=int(match["g"]))
    ratio, share = match["mdwa"], bool(match["asc"])
    if match["mp"]:  # LiteVAR's deployed composition (its Table 3's last row)
        layers = (*recipe.precision.layers, LayerOverride(LITEVAR_SENSITIVE, keep_float=True))
        recipe = dataclasses.replace(recipe, precision=dataclasses.replace(recipe.precision, layers=layers))
        ratio, share = ratio or LITEVAR_RATIO, True
    recipe = _with_attention(recipe, ratio, bool(match["grid"]), share, match["asc_threshold"])
    if match["auto"]:
        if not recipe.precision.quantize_probs:
            raise RecipeError(f"unknown recipe {name!r}: -auto chooses the attention probabilities' quantizer, which "
                              f"{match['method']} leaves in floating point")
        recipe = recipe.with_pass("choose_attention_scheme")
        recipe = dataclasses.replace(recipe, precision=dataclasses.replace(recipe.precision, attention_scheme="auto"))
    return recipe


def recipes() -> list[str]:
    """Names of the built-in recipes at the bit-widths the project's tables use."""
    names = []
    for method, (weights, activations) in _LISTED.items():
        for w in weights:
            for a in activations:
                names.append(f"{method}-w{w}a{a}")
                if method == "dgq":
                    names += [f"{method}-w{w}a{a}-g{k}" for k in _LISTED_GROUPS] + [f"{method}-w{w}a{a}-auto"]
    return sorted(names + [litevar_name(*row) for row in LITEVAR_ROWS] + [f"mdwa-{r:g}" for r in MDWA_RATIOS]
                  + ["mdwa2d-0.95", "asc", "mdwa-0.95-asc", "litevar-w4a8-mp"])


def litevar_name(w: int, a: int, qkv: int) -> str:
    """The built-in recipe of one LiteVAR W/A/QKV row (QKV at 8 bits needs no suffix)."""
    return f"litevar-w{w}a{a}" + ("" if qkv == 8 else f"-qkv{qkv}")


def get_recipe(recipe: str | os.PathLike | Recipe) -> Recipe:
    """A recipe from a built-in name, the path of a TOML file, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    text = os.fspath(recipe)
    if text.endswith(".toml") or isinstance(recipe, Path):
        if not Path(text).is_file():
            raise RecipeError(f"recipe file {text} does not exist")
        return Recipe.from_file(text)
    return _instantiate(text)

