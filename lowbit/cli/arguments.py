"""Argument types shared by the commands: a count below its minimum is refused by argparse, with
the option's name, before any work starts (instead of a traceback from deep inside sampling)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["at_least", "positive_int"]


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (``why`` says why, if not obvious)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}{f': {why}' if why else ''}")
        return value
    return parse


positive_int = at_least(1)
