"""Write a folder of outputs all at once, or not at all, and never destroy anything else.

Everything is written into a hidden staging folder beside the target (``.NAME.lowbit-staging-PID-XXXX``),
swapped in only when complete: the old output is renamed aside (``.NAME.lowbit-old-PID-XXXX``), the new one
renamed in, and only then is the old one removed. Renames within one folder are atomic, so an error, Ctrl-C,
SIGTERM or a crash at any point leaves the complete old or the complete new output at the target, never a
half-written one and never nothing. Every folder written here carries a marker file, ``.lowbit-output``;
overwriting replaces only folders that carry it (or empty ones), so ``--out . --overwrite`` or a typo in
``--out`` cannot wipe out unrelated files. Leftovers of killed runs are tidied by the next run beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["MARKER", "OutputExistsError", "UnsafeOverwriteError", "add_output_arguments", "check_output",
           "output_folder", "staged_folder"]

MARKER = ".lowbit-output"
_ACTIVE: set[Path] = set()  # staging/old folders this process is using right now


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class UnsafeOverwriteError(OutputExistsError):
    """Overwriting was asked for, but the target is not an output lowbit wrote, so replacing it could destroy data."""


class _Terminated(BaseException):
    """A signal that would have killed the process outright (``args[0]``), raised so that cleanup runs."""


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """A command's ``--out`` folder and its ``--overwrite`` switch."""
    parser.add_argument("--out", default=default, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing output folder that lowbit wrote (one holding {MARKER})")


def output_folder(args: argparse.Namespace) -> Path:
    """Refuse an existing or unsafe output folder before the long work starts, not after."""
    check_output(args.out, overwrite=args.overwrite)
    return Path(args.out)


def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Return the resolved target, or raise if writing there is not allowed. A missing target is always
    fine; an existing one needs ``overwrite``, and even then only a folder carrying the marker, or an empty
    folder (nothing to lose), is replaced. Leftovers of killed runs beside the target are tidied first,
    since that may bring back an output that a killed swap had moved aside."""
    target = Path(path).resolve()
    blocked = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutputExistsError(f"cannot write {path}: {blocked} is a file, not a folder; choose an output path whose "
                                f"parents are folders")
    _clean_leftovers(target)
    if not os.path.lexists(target):
        return target
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    reason = _unsafe_reason(target)
    if reason:
        raise UnsafeOverwriteError(
            f"refusing to overwrite {path} ({target}): it is {reason}. lowbit only replaces folders it wrote "
            f"itself (they hold a {MARKER} file); choose another output folder, or move or delete this one yourself")
    return target


def _unsafe_reason(target: Path) -> str | None:
    cwd = Path.cwd().resolve()
    named = {Path(os.path.expanduser("~")).resolve(): "your home folder", cwd: "the current working directory",
             Path(target.anchor): "the filesystem root"}
    if target in named:
        return named[target]
    if target in cwd.parents:
        return "a parent of the current working directory"
    if not target.is_dir():
        return "a file, not a folder"
    if (target / MARKER).is_file() or not any(target.iterdir()):
        return None
    return f"a folder lowbit did not write (it has no {MARKER} file)"


def _alive(folder: Path, pid: int) -> bool:
    """Whether the run that made ``folder`` may still be using it (the pid is encoded in its name)."""
    if pid == os.getpid():
        return folder in _ACTIVE  # otherwise a dead run had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    """Remove staging folders of dead runs; put back an old output whose swap was cut short."""
    if not target.name or not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.lowbit-(staging|old)-(\d+)-[0-9a-f]+")
    found = [(p, m) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    for p, m in sorted(found, key=lambda f: f[0].lstat().st_mtime, reverse=True):  # newest old output first
        if _alive(p, int(m[2])):
            continue
        if m[1] == "old" and not os.path.lexists(target):
            os.rename(p, target)  # the last complete output: killed after moving it aside
        else:
            shutil.rmtree(p, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.lowbit-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; at every step one complete output is at ``target`` or moved aside.
    On failure, look at the disk rather than at how far we got: an interrupt can land just after a rename."""
    old = _sibling(target, "old")
    _ACTIVE.add(old)
    try:
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(staging, target)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(target):
            os.rename(old, target)
        raise
    finally:
        _ACTIVE.discard(old)
    try:
        if os.path.lexists(old):
            shutil.rmtree(old)
    except OSError as err:  # the new output is in place; the next run tidies the old one
        warnings.warn(f"lowbit: wrote {target}, but could not remove the previous output moved aside to "
                          f"{old} ({err}); delete it yourself", stacklevel=4)


@contextmanager
def _unwind_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM that would kill the process outright into an exception, so cleanup runs,
    then re-deliver the signal so the process still dies of it. Handlers that already unwind
    (Python's KeyboardInterrupt, custom ones) and ignored signals are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ours = [s for s, h in previous.items() if h == signal.SIG_DFL]

    def handler(signum, frame):
        for s in ours:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        raise _Terminated(signum)

    for s in ours:
        signal.signal(s, handler)
    signum = None
    try:
        yield
    except _Terminated as err:
        signum = err.args[0]
    finally:
        for s in ours:
            signal.signal(s, previous[s])
    if signum is not None:
        signal.raise_signal(signum)  # dies here, as it would have without us
        raise SystemExit(128 + signum)


@contextmanager
def staged_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new staging folder (holding only the marker) that becomes ``path`` when the block ends
    without error. ``check_output`` says what may be replaced. Folders follow the umask, like any mkdir."""
    target = check_output(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "staging")
    with _unwind_on_signals():
        _ACTIVE.add(staging)
        try:
            staging.mkdir()
            (staging / MARKER).write_text(json.dumps(
                {"written_by": "lowbit", "note": "lowbit --overwrite replaces only folders holding this file"}) + "\n")
            yield staging
            _swap(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            _ACTIVE.discard(staging)
