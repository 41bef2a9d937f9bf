"""Passes by name: what a recipe file's ``[[passes]]`` list is turned into.

Every ``Pass`` subclass registers itself under its ``name`` when its module is imported; this
package imports them all. ``create`` builds a pass from its name and a table of settings checked
strictly against the constructor's annotations, so a misspelled pass, an unknown setting or a
value of the wrong type is refused with a message that names it and says what is accepted.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any

from lowbit.ir.typed import SettingError, check_value, describe
from lowbit.passes.base import PASSES, Pass

__all__ = ["create", "pass_settings"]


def _lookup(name: str, where: str) -> type[Pass]:
    if name not in PASSES:
        close = difflib.get_close_matches(name, PASSES, n=3) or sorted(PASSES)
        raise SettingError(f"{where}: unknown pass {name!r}; did you mean {', '.join(close)}?")
    return PASSES[name]


def pass_settings(name: str) -> dict[str, tuple[Any, Any]]:
    """The settings a pass takes: name -> (type annotation, default or inspect.Parameter.empty)."""
    cls = PASSES[name]
    hints = typing.get_type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
    params = inspect.signature(cls.__init__).parameters if cls.__init__ is not object.__init__ else {}
    return {p: (hints[p], params[p].default) for p in params if p != "self"}


def create(name: str, settings: dict[str, Any] | None = None, where: str = "recipe") -> Pass:
    """The pass ``name`` configured with ``settings`` (checked against its constructor)."""
    cls = _lookup(name, where)
    accepted = pass_settings(name)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        known = ", ".join(f"{k} ({describe(h)})" for k, (h, _) in accepted.items()) or "none"
        raise SettingError(f"{where}: pass {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: {known}")
    checked = {k: check_value(v, accepted[k][0], f"{where}: {name}.{k}") for k, v in settings.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as err:
        raise SettingError(f"{where}: pass {name!r}: {err}") from err
