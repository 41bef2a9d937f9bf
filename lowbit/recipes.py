"""Recipes: which passes run, with which settings, as versioned data.

A Recipe is a frozen dataclass that checks itself, round-trips through TOML and JSON, and is
saved next to every quantized model. Built-in recipes are named ``"<method>-w<X>a<Y>"``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from typing import Literal

import tomli_w

from lowbit.ir.annotations import MAX_BITS, MIN_BITS, QuantSpec
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.base import Pass
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.choose_quant_params import ChooseQuantParams
from lowbit.passes.convert_to_quantized_ops import ConvertToQuantizedOps
from lowbit.passes.detect_outlier_dim import DetectOutlierDim
from lowbit.passes.group_activations import GroupActivations
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.reconstruct_weights import ReconstructWeights
from lowbit.passes.split_start_token import SplitStartToken

__all__ = ["DGQ_DEFAULT_GROUPS", "RECIPE_VERSION", "Recipe", "RecipeError", "dgq", "get_recipe", "recipes"]

RECIPE_VERSION = 1
_BASELINE_BITS = (4, 6, 8, 16)
_DGQ_WEIGHT_BITS, _DGQ_ACTIVATION_BITS, _DGQ_GROUPS = (4, 8), (6, 8), (1, 2, 4, 8, 16)
DGQ_DEFAULT_GROUPS = 8


class RecipeError(ValueError):
    """An invalid recipe: the message names the field and the accepted values."""


@dataclass(frozen=True)
class Recipe:
    """Settings of a quantization run.

    ``activation_mode`` "per_timestep" keeps one activation range per calibrated diffusion
    timestep (TFMQ-DM, DGQ eq. 7); ``attention_bits`` None quantizes attention probabilities at
    the activation bit-width (DGQ's setting; Q-Diffusion keeps them at 16 for SD).

    DGQ's parts, each switchable for ablation: ``groups`` K > 0 clusters activation ranges into K
    groups (eq. 6-7; None keeps one range per tensor) along the outlier dimension when
    ``select_dim`` (eq. 4-5) or along channels otherwise; ``attention_scheme`` "log2" (eq. 2),
    ``start_token`` (keep the start-token column of cross-attention in full precision, eq. 9) and
    ``dynamic_attention_scale`` (s = max of the probabilities at run time, eq. 8).
    ``group_text_tokens`` lets eq. 5 pick the token axis also where it holds text positions
    (cross-attention keys and values); by default those operands are grouped along channels,
    because text positions change content with the phrasing (see group_activations).

    ``weight_range`` "adaround" starts from the MSE ranges and learns each weight's rounding by
    BRECQ block-wise reconstruction (reconstruct_weights), ``reconstruction_iterations`` per
    block on ``reconstruction_samples`` calibration samples kept at random from the stream.
    """

    name: str
    weight_bits: float
    activation_bits: float
    weight_range: Literal["minmax", "mse", "adaround"] = "minmax"
    activation_mode: Literal["static", "per_timestep"] = "per_timestep"
    quantize_attention: bool = True
    attention_bits: float | None = None
    keep_fp: tuple[str, ...] = ()
    keep_io_layers: bool = True
    groups: int | None = None
    select_dim: bool = True
    attention_scheme: Literal["uniform", "log2"] = "uniform"
    start_token: bool = False
    dynamic_attention_scale: bool = False
    group_text_tokens: bool = False
    reconstruction_iterations: int = 200
    reconstruction_samples: int = 8
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe {self.name!r} has version {self.version}; this lowbit reads version {RECIPE_VERSION}")
        for field in ("weight_bits", "activation_bits", "attention_bits"):
            bits = getattr(self, field)
            if bits is not None and not (MIN_BITS <= float(bits) <= MAX_BITS):
                raise RecipeError(f"recipe {self.name!r}: {field} = {bits} is outside [{MIN_BITS:g}, {MAX_BITS:g}]")
        if self.weight_range not in ("minmax", "mse", "adaround"):
            raise RecipeError(f"recipe {self.name!r}: weight_range must be 'minmax', 'mse' or 'adaround', not {self.weight_range!r}")
        for field in ("reconstruction_iterations", "reconstruction_samples"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise RecipeError(f"recipe {self.name!r}: {field} must be a positive integer, not {getattr(self, field)!r}")
        if self.activation_mode not in ("static", "per_timestep"):
            raise RecipeError(f"recipe {self.name!r}: activation_mode must be 'static' or 'per_timestep', not {self.activation_mode!r}")
        if self.groups is not None and (not isinstance(self.groups, int) or self.groups < 1):
            raise RecipeError(f"recipe {self.name!r}: groups must be a positive integer or absent, not {self.groups!r}")
        if self.attention_scheme not in ("uniform", "log2"):
            raise RecipeError(f"recipe {self.name!r}: attention_scheme must be 'uniform' or 'log2', not {self.attention_scheme!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))

    # -- the passes this recipe runs -------------------------------------------------------

    def structure_passes(self) -> list[Pass]:
        """The rewriting passes that do not depend on calibration (replayed by ``lowbit.load``)."""
        passes = [CanonicalizeAttention(), self._annotate()]
        return passes + [SplitStartToken()] if self.start_token else passes

    def prepare_passes(self) -> list[Pass]:
        """Passes before calibration: rewrite, annotate, observe."""
        return self.structure_passes() + [InsertObservers()]

    @property
    def kept_samples(self) -> int:
        """Calibration samples that lowbit.quantize keeps for the convert passes (weight reconstruction)."""
        return self.reconstruction_samples if self.weight_range == "adaround" else 0

    def convert_passes(self) -> list[Pass]:
        """Passes after calibration: choose parameters, emit quantized ops."""
        passes: list[Pass] = [ChooseQuantParams("mse" if self.weight_range == "adaround" else self.weight_range)]
        if self.weight_range == "adaround":
            passes += [ReconstructWeights(self.reconstruction_iterations)]
        if self.groups is not None:
            passes += [DetectOutlierDim()] if self.select_dim else []
            passes += [GroupActivations(self.groups, self.select_dim, self.group_text_tokens)]
        return passes + [ConvertToQuantizedOps()]

    def _annotate(self) -> AnnotateQuantization:
        weight = QuantSpec(self.weight_bits, granularity="channel", axis=0, symmetric=True)
        activation = QuantSpec(self.activation_bits, mode=self.activation_mode)
        probs = QuantSpec(self.attention_bits or self.activation_bits, scheme=self.attention_scheme,
                          mode="dynamic" if self.dynamic_attention_scale else self.activation_mode)
        return AnnotateQuantization(weight, activation, probs, self.keep_fp, self.keep_io_layers, self.quantize_attention)

    # -- serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["keep_fp"] = list(self.keep_fp)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        if "name" not in data or "weight_bits" not in data or "activation_bits" not in data:
            raise RecipeError("a recipe needs at least name, weight_bits and activation_bits")
        return cls(**data)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> Recipe:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"recipe file is not valid TOML: {err}") from err
        return cls.from_dict(data)


def dgq(weight_bits: float, activation_bits: float, groups: int = DGQ_DEFAULT_GROUPS, name: str | None = None) -> Recipe:
    """DGQ with every part on. Weights stay min-max per channel, so that "dgq" against "minmax"
    isolates DGQ's activation and attention quantizers."""
    return Recipe(name or f"dgq-w{weight_bits:g}a{activation_bits:g}-g{groups}", weight_bits, activation_bits,
                  groups=groups, attention_scheme="log2", start_token=True, dynamic_attention_scale=True)


def _builtin() -> dict[str, Recipe]:
    out = {}
    for w in _BASELINE_BITS:
        for a in _BASELINE_BITS:
            out[f"minmax-w{w}a{a}"] = Recipe(f"minmax-w{w}a{a}", w, a)
            out[f"mse-w{w}a{a}"] = Recipe(f"mse-w{w}a{a}", w, a, weight_range="mse")
            out[f"adaround-w{w}a{a}"] = Recipe(f"adaround-w{w}a{a}", w, a, weight_range="adaround")
    for w in _DGQ_WEIGHT_BITS:
        for a in _DGQ_ACTIVATION_BITS:
            out[f"dgq-w{w}a{a}"] = dgq(w, a, name=f"dgq-w{w}a{a}")
            for k in _DGQ_GROUPS:
                out[f"dgq-w{w}a{a}-g{k}"] = dgq(w, a, k)
    return out


_RECIPES = _builtin()


def recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(_RECIPES)


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe in _RECIPES:
        return _RECIPES[recipe]
    close = [n for n in _RECIPES if n.split("-")[0] == str(recipe).split("-")[0]][:6] or recipes()[:6]
    raise RecipeError(f"unknown recipe {recipe!r}; built-in recipes include {', '.join(close)} (see lowbit.recipes())")
