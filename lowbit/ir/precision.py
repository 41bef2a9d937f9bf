"""What precision each layer gets: the recipe's defaults, overridden per layer by fnmatch patterns.

A recipe says "W4A8, attention probabilities at 8 bits" once and then, per ``[layers."pattern"]``
table, what differs for the layers whose module path matches: another bit-width, or ``float``
(kept in floating point; fp16 on the phone). Where several patterns match a layer the later one
wins, field by field, and the resolution names the patterns that set it, so reports can say
why a layer got what it got. ``annotate_quantization`` reads this from the pass context.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, fields, replace
from typing import Iterable, Literal

from lowbit.ir.annotations import MAX_BITS, MIN_BITS

__all__ = ["LayerOverride", "LayerPrecision", "Precision", "PrecisionError"]

ActivationMode = Literal["static", "per_step", "dynamic"]
AttentionScheme = Literal["uniform", "log2", "auto"]


class PrecisionError(ValueError):
    """An invalid precision setting or a pattern that fits no layer; the message names it."""


def _check_bits(where: str, bits: float | None) -> None:
    if bits is not None and not (MIN_BITS <= float(bits) <= MAX_BITS):
        raise PrecisionError(f"{where} = {bits} is outside [{MIN_BITS:g}, {MAX_BITS:g}]")


@dataclass(frozen=True)
class LayerOverride:
    """One ``[layers."pattern"]`` table: the fields it sets (None: not set here)."""

    pattern: str
    weight_bits: float | None = None
    activation_bits: float | None = None
    attention_bits: float | None = None
    qkv_bits: float | None = None
    keep_float: bool | None = None  # "float" in TOML

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits", "attention_bits", "qkv_bits"):
            _check_bits(f'layers."{self.pattern}".{name}', getattr(self, name))
        if not self.settings():
            raise PrecisionError(f'layers."{self.pattern}" sets nothing: give weight_bits, activation_bits, '
                                 f"attention_bits, qkv_bits or float")

    def settings(self) -> dict:
        """The fields this table sets, by attribute name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pattern" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class LayerPrecision:
    """The settings one layer ends up with, and the patterns that set any of them (in order)."""

    weight_bits: float
    activation_bits: float
    attention_bits: float
    qkv_bits: float
    keep_float: bool | None  # None: not said, the recipe's keep_io_layers decides
    set_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Precision:
    """The recipe's precision: defaults for every layer, then the per-layer overrides in order.

    ``attention_bits`` None quantizes attention probabilities at the activation bit-width (DGQ's
    setting), ``qkv_bits`` None the attention's Q, K and V (LiteVAR's "QKV" column sets them apart);
    ``quantize_probs`` False leaves the probabilities alone (LiteVAR). ``activation_mode``
    "per_step" keeps one activation range per calibrated step (TFMQ-DM, DGQ eq. 7); "dynamic"
    takes each range from the tensor at run time (LiteVAR §4: min-max per token for linear inputs,
    Q and K; per tensor for V), so it needs no calibration but has no form on the phone's HTP.
    ``keep_io_layers`` keeps the model's first and last weighted layers in floating point
    (Q-Diffusion and DGQ do). ``attention_scheme`` "log2" is DGQ eq. 2 for the
    probabilities, "auto" lets ``choose_attention_scheme`` pick per layer from calibration;
    ``dynamic_attention_scale`` takes their scale from the tensor at run time (eq. 8).
    """

    weight_bits: float
    activation_bits: float
    attention_bits: float | None = None
    qkv_bits: float | None = None
    activation_mode: ActivationMode = "per_step"
    quantize_attention: bool = True
    quantize_probs: bool = True
    keep_io_layers: bool = True
    attention_scheme: AttentionScheme = "uniform"
    dynamic_attention_scale: bool = False
    layers: tuple[LayerOverride, ...] = ()

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits", "attention_bits", "qkv_bits"):
            _check_bits(name, getattr(self, name))
        object.__setattr__(self, "layers", tuple(self.layers))

    def default(self) -> LayerPrecision:
        return LayerPrecision(self.weight_bits, self.activation_bits, self.attention_bits or self.activation_bits,
                              self.qkv_bits or self.activation_bits, None)

    def resolve(self, path: str) -> LayerPrecision:
        """The settings of the layer at ``path``: defaults, then each matching override in order."""
        out = self.default()
        for override in self.layers:
            if fnmatch.fnmatchcase(path, override.pattern):
                changes = override.settings()
                for follower in ("attention_bits", "qkv_bits"):  # unless set apart, they follow the activations
                    if getattr(override, follower) is None and override.activation_bits is not None and getattr(self, follower) is None:
                        changes[follower] = override.activation_bits
                out = replace(out, **changes, set_by=out.set_by + (override.pattern,))
        return out

    def check_patterns(self, paths: Iterable[str]) -> None:
        """Every override must match at least one layer: a typo is an error, not a silent no-op."""
        paths = sorted(set(paths))
        for override in self.layers:
            if not any(fnmatch.fnmatchcase(p, override.pattern) for p in paths):
                close = difflib.get_close_matches(override.pattern, paths, n=5, cutoff=0.4) or paths[:5]
                raise PrecisionError(f'layers."{override.pattern}" matches no layer of this model; '
                                     f"close layer names: {', '.join(close)}")
