"""Strict checking of settings read from files against their type annotations.

Recipe fields, per-layer tables and pass settings come from TOML written by hand; a value of the
wrong type must be refused where it is read, naming the field, the value and what is accepted,
never coerced (``"false"`` is not a boolean, ``"8"`` is not a number, a string is not a list).
The only conversions are the lossless ones TOML forces: an integer where a float is asked for,
and a list where a tuple is.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

__all__ = ["SettingError", "check_value", "describe"]


class SettingError(ValueError):
    """A setting of the wrong type or outside its choices; the message names it."""


def describe(hint: Any) -> str:
    """What a type annotation accepts, in words a recipe author reads."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("nothing (leave it out)" if a is type(None) else describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list, each {describe(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it has the annotated type (lists become tuples, ints floats), else SettingError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
    elif origin in (Union, types.UnionType):
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return check_value(value, option, where)
            except SettingError:
                continue
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tuple(check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if isinstance(value, int) else value
    elif hint in (int, str, bool):
        if type(value) is hint:
            return value
    else:
        raise TypeError(f"{where}: no check for annotation {hint!r}")
    raise SettingError(f"{where} = {value!r} must be {describe(hint)}")
