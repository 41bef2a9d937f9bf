"""Typed annotations that passes attach to fx nodes.

Everything a pass knows about a node lives under one of the constant keys below, with a
frozen dataclass behind it that checks itself on construction, so an invalid annotation
fails where it is made (naming the field) instead of deep inside a later pass.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from lowbit.ir.typed import SettingError, check_value

__all__ = [
    "ATTENTION_KEY",
    "CREATED_BY_KEY",
    "LAYER_KEY",
    "OUTLIER_KEY",
    "QUANT_KEY",
    "AttentionInfo",
    "LayerInfo",
    "OutlierDim",
    "QuantAnnotation",
    "QuantSpec",
]

LAYER_KEY = "lowbit.layer"
QUANT_KEY = "lowbit.quant"
ATTENTION_KEY = "lowbit.attention"
CREATED_BY_KEY = "lowbit.created_by"
OUTLIER_KEY = "lowbit.outlier_dim"  # dict: operand name -> OutlierDim

Scheme = Literal["uniform", "log2", "auto"]  # "auto": undecided until choose_attention_scheme
Granularity = Literal["tensor", "channel", "token", "group"]
Mode = Literal["static", "dynamic", "per_step"]
LayerKind = Literal["linear", "conv2d", "attention"]
AttentionKind = Literal["self", "cross", "joint", "cached"]

MIN_BITS, MAX_BITS = 2.0, 16.0


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits`` is a float so that fractional bit-widths (FraQAT) fit: a b-bit quantizer has
    floor(2**b) levels, e.g. 5.5 bits gives 45 levels, symmetric range [-22, 21].
    ``groups`` (granularity "group" only) gives the group of every vector along ``axis``, one row
    per calibrated timestep — DGQ re-clusters at every timestep — or a single row when static.
    """

    bits: float
    scheme: Scheme = "uniform"
    granularity: Granularity = "tensor"
    symmetric: bool = False
    mode: Mode = "static"
    axis: int | None = None
    groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not (MIN_BITS <= float(self.bits) <= MAX_BITS) or math.isnan(self.bits):
            raise ValueError(f"bits must lie in [{MIN_BITS:g}, {MAX_BITS:g}]; got {self.bits}")
        _check_choice("scheme", self.scheme, ("uniform", "log2", "auto"))
        _check_choice("granularity", self.granularity, ("tensor", "channel", "token", "group"))
        _check_choice("mode", self.mode, ("static", "dynamic", "per_step"))
        if self.granularity == "tensor" and self.axis is not None:
            raise ValueError("a per-tensor spec takes no axis")
        if self.granularity != "tensor" and self.axis is None:
            raise ValueError(f"granularity {self.granularity!r} needs an axis")
        if self.granularity == "group":
            if not self.groups or not all(self.groups):
                raise ValueError("granularity 'group' needs the group of every vector along the axis")
            if len({len(row) for row in self.groups}) != 1:
                raise ValueError("every timestep's group assignment must cover the same vectors")
            if min(min(row) for row in self.groups) < 0:
                raise ValueError("groups are numbered from 0")
        elif self.groups is not None:
            raise ValueError(f"groups are only valid with granularity 'group', not {self.granularity!r}")
        if self.scheme == "log2" and self.symmetric:
            raise ValueError("the log2 scheme quantizes non-negative values and cannot be symmetric")

    @property
    def levels(self) -> int:
        return int(math.floor(2.0 ** float(self.bits)))

    @property
    def qmin(self) -> int:
        return -(self.levels // 2) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return self.levels // 2 - 1 if self.symmetric else self.levels - 1

    @property
    def num_groups(self) -> int:
        return max(max(row) for row in self.groups) + 1 if self.groups else 1

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["groups"] = [list(row) for row in self.groups] if self.groups is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> QuantSpec:
        """The spec ``to_dict`` wrote, every field checked for its type (ValueError naming it)."""
        if not isinstance(data, dict):
            raise SettingError(f"{where} is a {type(data).__name__}, not a table of fields")
        hints = typing.get_type_hints(cls)
        missing, unknown = sorted(set(hints) - set(data)), sorted(set(data) - set(hints))
        if missing or unknown:
            problem = f"lacks {missing}" if missing else f"has unknown fields {unknown}"
            raise SettingError(f"{where} {problem}; a spec has the fields {sorted(hints)}")
        return cls(**{k: check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()})


@dataclass(frozen=True)
class LayerInfo:
    """The user-facing identity of a node: its module path (``transformer_blocks.3.attn2.to_q``)."""

    path: str
    kind: LayerKind

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("linear", "conv2d", "attention"))


_OPERANDS = ("input", "weight", "query", "key", "value", "probs")


@dataclass(frozen=True)
class QuantAnnotation:
    """Which operands of a layer are quantized and how (``None`` keeps full precision).

    For a linear or convolution, ``input`` is its activation and ``weight`` its weight; for an
    attention, ``query``/``key``/``value`` are its operands and ``probs`` the softmax output, and
    ``start_token`` the key column kept in full precision (DGQ eq. 9), if any.
    """

    input: QuantSpec | None = None
    weight: QuantSpec | None = None
    query: QuantSpec | None = None
    key: QuantSpec | None = None
    value: QuantSpec | None = None
    probs: QuantSpec | None = None
    start_token: int | None = None

    def __post_init__(self) -> None:
        if self.start_token is not None and (self.probs is None or self.start_token < 0):
            raise ValueError("start_token needs a probs spec and a non-negative column index")
        for name in _OPERANDS:
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(f"{name} must be a QuantSpec or None; got {type(spec).__name__}")
        if self.weight is not None and self.weight.mode != "static":
            raise ValueError("weights are quantized once, so their mode must be 'static'")

    def operands(self) -> dict[str, QuantSpec]:
        return {k: getattr(self, k) for k in _OPERANDS if getattr(self, k) is not None}


@dataclass(frozen=True)
class AttentionInfo:
    """What canonicalize_attention learned about one attention.

    ``key_sources`` names the graph inputs the keys come from, one per key segment, in order
    (a joint attention concatenates image and text keys); ``key_lengths`` gives each segment's
    token count so that later passes can find the start-token column of the text segment.
    """

    kind: AttentionKind
    module: str
    key_sources: tuple[str, ...]
    key_lengths: tuple[int, ...]
    heads: int
    scale: float
    has_mask: bool = False

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("self", "cross", "joint", "cached"))
        if len(self.key_sources) != len(self.key_lengths) or not self.key_sources:
            raise ValueError("key_sources and key_lengths must be non-empty and of equal length")
        if self.scale <= 0 or self.heads <= 0:
            raise ValueError(f"scale and heads must be positive; got {self.scale}, {self.heads}")


@dataclass(frozen=True)
class OutlierDim:
    """DGQ eq. 4-5 for one activation: the range spread along channels and along tokens/pixels.

    D_d = (max_i a_max - min_i a_max) + (max_i a_min - min_i a_min) over the vectors i along d;
    the dimension with the larger spread is where the outliers sit, and where grouping pays.
    ``text_tokens`` says that the token axis holds text positions (cross-attention keys and
    values, the caption projection): what sits at a text position depends on the prompt's
    phrasing, so a range fitted to one position on the calibration prompts does not hold there
    for other prompts, unlike a channel or an image pixel.
    """

    channel_spread: float
    token_spread: float
    text_tokens: bool = False

    def __post_init__(self) -> None:
        if not (self.channel_spread >= 0 and self.token_spread >= 0):
            raise ValueError(f"spreads are non-negative; got {self.channel_spread}, {self.token_spread}")

    @property
    def chosen(self) -> Literal["channel", "token"]:
        return "channel" if self.channel_spread >= self.token_spread else "token"
