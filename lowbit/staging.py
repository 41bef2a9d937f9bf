"""Write a folder of outputs all at once, or not at all.

Everything goes to a temporary sibling folder that replaces the target only when complete, so
an error, a bad input or Ctrl-C never leaves a half-written model or report behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["OutputExistsError", "add_output_arguments", "output_folder", "staged_folder"]


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """A command's ``--out`` folder and its ``--overwrite`` switch."""
    parser.add_argument("--out", default=default, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def output_folder(args: argparse.Namespace) -> Path:
    """Refuse an existing output folder before the long work starts, not after."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    return out


@contextmanager
def staged_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block ends without error."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
