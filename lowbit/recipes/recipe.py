"""A recipe: the precision every layer gets and the passes that run, as data that reads from TOML.

```toml
name = "w4a8-fc2-w8"
weight_bits = 4
activation_bits = 8
[layers."*.ff.net.2"]          # fnmatch on layer paths; the later of two matching tables wins
weight_bits = 8
[layers."proj_out"]
float = true                    # kept in floating point (fp16 on the phone)
[[passes]]                      # the pipeline, in order, each pass with its settings
name = "canonicalize_attention"
...
```

The top-level fields are the recipe's :class:`~lowbit.ir.precision.Precision`; ``[[passes]]``
lists registered passes by name (``lowbit.passes.registry``), and a recipe that lists none runs
the standard post-training pipeline. Everything is checked when the recipe is read: an unknown
field, a value of the wrong type, a misspelled pass or setting, a violated ordering constraint
— each refused with a message naming the file, the field and what is accepted.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lowbit.ir.precision import LayerOverride, Precision, PrecisionError
from lowbit.ir.typed import SettingError, check_value
from lowbit.passes import PASSES, Pass, Pipeline, create
from lowbit.passes.base import PHASES, PassError

__all__ = ["RECIPE_VERSION", "STANDARD_PASSES", "PassStep", "Recipe", "RecipeError"]

RECIPE_VERSION = 2


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the field and the accepted values."""


@dataclass(frozen=True)
class PassStep:
    """One entry of a recipe's pipeline: a registered pass and its settings."""

    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    def create(self, where: str = "recipe") -> Pass:
        return create(self.name, dict(self.settings), where)

    def to_dict(self) -> dict:
        return {"name": self.name, **dict(self.settings)}


STANDARD_PASSES = tuple(PassStep(n) for n in ("canonicalize_attention", "annotate_quantization", "insert_observers",
                                              "choose_quant_params", "convert_to_quantized_ops"))
_PRECISION_FIELDS = {f.name: f for f in dataclasses.fields(Precision) if f.name != "layers"}
_LAYER_FIELDS = {"weight_bits": "weight_bits", "activation_bits": "activation_bits", "attention_bits": "attention_bits",
                 "qkv_bits": "qkv_bits",
                 "float": "keep_float"}  # TOML key -> LayerOverride attribute


@dataclass(frozen=True)
class Recipe:
    """A named precision and pipeline. Build one in Python with :meth:`build` and :meth:`with_pass`,
    or read one with :meth:`from_toml` / :meth:`from_file`."""

    name: str
    precision: Precision
    passes: tuple[PassStep, ...] = STANDARD_PASSES
    description: str = ""
    version: int = RECIPE_VERSION
    source: str = field(default="recipe", compare=False)  # where it was read from, for messages

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"{self.source}: recipe {self.name!r} has version {self.version}; this lowbit reads version "
                              f"{RECIPE_VERSION} (the pass list is spelled out since version 2: see lowbit/recipes/builtin/)")
        object.__setattr__(self, "passes", tuple(self.passes))
        try:
            pipeline = self.pipeline()
            Pipeline(pipeline).check_order([])
        except (SettingError, PassError) as err:
            raise RecipeError(f"{self.source}: recipe {self.name!r}: {str(err).removeprefix(f'{self.source}: ')}") from None
        if not any(p.name == "annotate_quantization" for p in pipeline):
            raise RecipeError(f"{self.source}: recipe {self.name!r}: its passes list no annotate_quantization: nothing would "
                              f"be quantized")
        if self.precision.attention_scheme == "auto" and self.precision.quantize_probs and not any(
                p.name == "choose_attention_scheme" for p in pipeline):
            raise RecipeError(f"{self.source}: recipe {self.name!r} sets attention_scheme = \"auto\" but lists no "
                              f"choose_attention_scheme pass to decide it (put it after insert_observers)")

    @classmethod
    def build(cls, name: str, weight_bits: float, activation_bits: float, *, passes: tuple[PassStep, ...] = STANDARD_PASSES,
              layers: dict[str, dict] | None = None, description: str = "", **precision: Any) -> Recipe:
        """A recipe from Python values: ``Recipe.build("w4a8", 4, 8, layers={"proj_out": {"float": True}})``."""
        data = {"name": name, "weight_bits": weight_bits, "activation_bits": activation_bits, "description": description,
                **precision, "layers": layers or {}, "passes": [s.to_dict() for s in passes]}
        return cls.from_dict(data, "Recipe.build")

    # -- the pipeline ------------------------------------------------------------------------

    def pipeline(self) -> list[Pass]:
        return [step.create(self.source) for step in self.passes]

    def phase_passes(self, *phases: str) -> list[Pass]:
        """The configured passes of the given phases, in order (load replays "rewrite" and "convert")."""
        return [p for p in self.pipeline() if p.phase in phases]

    def with_pass(self, name: str, **settings: Any) -> Recipe:
        """This recipe with one more pass (or the pass's settings replaced), placed after the passes it
        requires and after every pass of an earlier phase."""
        if name not in PASSES:
            create(name, settings, self.source)  # raises the unknown-pass error
        steps = [s for s in self.passes if s.name != name]
        new = PassStep(name, tuple(sorted(settings.items())))
        cls = PASSES[name]
        after = [i + 1 for i, s in enumerate(steps)
                 if s.name in cls.requires or PHASES.index(PASSES[s.name].phase) < PHASES.index(cls.phase)]
        at = next((i for i, s in enumerate(self.passes) if s.name == name), None)
        position = at if at is not None else max(after, default=0)
        steps.insert(position, new)
        return dataclasses.replace(self, passes=tuple(steps))

    def with_settings(self, name: str, **changes: Any) -> Recipe:
        """This recipe with some settings of its pass ``name`` changed and the others kept."""
        step = next((s for s in self.passes if s.name == name), None)
        if step is None:
            raise RecipeError(f"{self.source}: recipe {self.name!r} runs no pass {name!r}; its passes: "
                              f"{', '.join(s.name for s in self.passes)}")
        return self.with_pass(name, **dict(step.settings) | changes)

    # -- reading and writing ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description:
            out["description"] = self.description
        out |= {k: getattr(self.precision, k) for k in _PRECISION_FIELDS if getattr(self.precision, k) is not None}
        layers = {o.pattern: {k: getattr(o, a) for k, a in _LAYER_FIELDS.items() if getattr(o, a) is not None}
                  for o in self.precision.layers}
        if layers:
            out["layers"] = layers
        out["passes"] = [s.to_dict() for s in self.passes]
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a table of fields, not a {type(data).__name__}")
        known = {"name", "version", "description", "layers", "passes", *_PRECISION_FIELDS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe field(s) {unknown}; known fields: {sorted(known)}")
        missing = [k for k in ("name", "weight_bits", "activation_bits") if k not in data]
        if missing:
            raise RecipeError(f"{source}: a recipe needs at least name, weight_bits and activation_bits (missing {missing})")
        try:
            hints = typing.get_type_hints(Precision)
            values = {k: check_value(data[k], hints[k], f"{source}: {k}") for k in _PRECISION_FIELDS if k in data}
            precision = Precision(**values, layers=_layers(data.get("layers", {}), source))
            return cls(name=check_value(data["name"], str, f"{source}: name"), precision=precision,
                       passes=_passes(data["passes"], source) if "passes" in data else STANDARD_PASSES,
                       description=check_value(data.get("description", ""), str, f"{source}: description"),
                       version=check_value(data.get("version", RECIPE_VERSION), int, f"{source}: version"), source=source)
        except (SettingError, PrecisionError) as err:
            raise RecipeError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{source} is not valid TOML: {err}") from err
        return cls.from_dict(data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"recipe file {path} cannot be read: {err}") from err
        return cls.from_toml(text, str(path))


def _layers(tables: Any, source: str) -> tuple[LayerOverride, ...]:
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise SettingError(f"{source}: layers must be tables [layers.\"pattern\"] of settings")
    hints = typing.get_type_hints(LayerOverride)
    out = []
    for pattern, table in tables.items():
        where = f'{source}: layers."{pattern}"'
        unknown = sorted(set(table) - set(_LAYER_FIELDS))
        if unknown:
            raise SettingError(f"{where} has unknown field(s) {unknown}; a layer table sets {sorted(_LAYER_FIELDS)}")
        values = {a: check_value(table[k], hints[a], f"{where}.{k}") for k, a in _LAYER_FIELDS.items() if k in table}
        out.append(LayerOverride(pattern, **values))
    return tuple(out)


def _passes(entries: Any, source: str) -> tuple[PassStep, ...]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SettingError(f"{source}: passes must be a list of [[passes]] tables, each with a name")
    steps = []
    for i, entry in enumerate(entries):
        settings = dict(entry)
        name = check_value(settings.pop("name", None), str, f"{source}: passes[{i}].name")
        steps.append(PassStep(name, tuple(sorted(settings.items()))))
    return tuple(steps)
