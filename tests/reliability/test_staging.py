"""Outputs never destroy anything: refusals, atomic swaps under injected failures, signals, stale leftovers."""

import argparse
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

import lowbit.core.staging as staging
from lowbit.core.staging import MARKER, OutputExistsError, UnsafeOverwriteError, check_output, output_folder, staged_folder

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "more/c.txt": "new c"}


def _write(folder: Path, files: dict) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _tree(folder: Path) -> dict:
    """Every file and folder below ``folder``: file contents, and None for folders."""
    return {str(p.relative_to(folder)): (p.read_text() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _output(path: Path, files: dict) -> dict:
    """Write a complete lowbit output at ``path`` and return its tree."""
    with staged_folder(path, overwrite=True) as tmp:
        _write(tmp, files)
    return _tree(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait(timeout=30)
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("the pid of a finished process was reused at once")


# --- refusals: nothing outside lowbit's own outputs is ever deleted ---------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder full of someone's files, inside a parent holding more of them."""
    _write(tmp_path, {"keep.txt": "parent's", "work/notes.txt": "mine", "work/data/x.bin": "precious"})
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


@pytest.mark.parametrize("target, reason", [(".", "current working directory"), ("", "current working directory"),
                                            ("..", "a parent of the current working directory")])
def test_refuses_cwd_and_its_parents(workdir, target, reason):
    before = _tree(workdir)
    with pytest.raises(UnsafeOverwriteError, match=reason):
        with staged_folder(target, overwrite=True):
            pytest.fail("the block must not run")
    assert _tree(workdir) == before
    with pytest.raises(UnsafeOverwriteError, match=reason):  # --out . --overwrite is refused before the long work
        output_folder(argparse.Namespace(out=target, overwrite=True))
    assert _tree(workdir) == before


def test_refuses_root_and_home(workdir, monkeypatch):
    with pytest.raises(UnsafeOverwriteError, match="filesystem root"):
        check_output("/", overwrite=True)  # a check only: staged_folder("/") is too dangerous to try in a test
    monkeypatch.setenv("HOME", str(workdir / "work" / "data"))
    before = _tree(workdir)
    with pytest.raises(UnsafeOverwriteError, match="home folder"):
        with staged_folder(workdir / "work" / "data", overwrite=True):
            pytest.fail("the block must not run")
    assert _tree(workdir) == before


def test_refuses_folder_without_marker_and_files(workdir):
    before = _tree(workdir)
    with pytest.raises(UnsafeOverwriteError, match=f"did not write.*{MARKER}.*choose another output folder"):
        with staged_folder("data", overwrite=True):
            pytest.fail("the block must not run")
    with pytest.raises(UnsafeOverwriteError, match="a file, not a folder"):
        with staged_folder("notes.txt", overwrite=True):
            pytest.fail("the block must not run")
    with pytest.raises(UnsafeOverwriteError, match="a file, not a folder"):
        output_folder(argparse.Namespace(out="notes.txt", overwrite=True))
    assert _tree(workdir) == before


def test_existing_output_needs_overwrite(tmp_path):
    old = _output(tmp_path / "out", OLD)
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True") as err:
        with staged_folder(tmp_path / "out"):
            pytest.fail("the block must not run")
    assert not isinstance(err.value, UnsafeOverwriteError)
    assert _tree(tmp_path / "out") == old


def test_missing_target_is_fine_and_checking_creates_nothing(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "a" / "b"), overwrite=False)
    assert output_folder(args) == Path(args.out)
    assert list(tmp_path.iterdir()) == []


# --- the happy path ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_then_replace(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "deep" / "out"
        _output(out, OLD)
        assert (out / MARKER).is_file() and "lowbit" in (out / MARKER).read_text()
        for folder in (out, out.parent, out / "sub"):
            assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder  # follows the umask, not mkdtemp's 0700
        assert (out / MARKER).stat().st_mode & 0o777 == 0o666 & ~umask
        new = _output(out, NEW)
        assert {k: v for k, v in new.items() if k != MARKER} == {**NEW, "more": None}
        assert os.listdir(out.parent) == ["out"]  # no staging or old folder left beside it
    finally:
        os.umask(previous)


def test_empty_folder_may_be_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    _output(tmp_path / "out", NEW)
    assert (tmp_path / "out" / "a.txt").read_text() == "new a"


def test_error_in_block_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    old = _output(out, OLD)
    with pytest.raises(RuntimeError, match="bad input"):
        with staged_folder(out, overwrite=True) as tmp:
            _write(tmp, NEW)
            raise RuntimeError("bad input")
    assert _tree(out) == old
    assert os.listdir(tmp_path) == ["out"]


# --- failure injection at every step ------------------------------------------------------------------------------

class Injected(OSError):
    pass


class InjectedInterrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("error", [Injected, InjectedInterrupt])
@pytest.mark.parametrize("after", [False, True], ids=["instead-of-call", "after-call"])
def test_failure_at_every_step_leaves_a_complete_output(tmp_path, monkeypatch, error, after):
    """Fail the nth call of every filesystem operation staging uses, either instead of the call or just after it
    (an interrupt landing right after a rename); ``out`` always holds a complete output, old or new."""
    originals = {"rename": os.rename, "replace": os.replace, "mkdir": os.mkdir, "rmtree": shutil.rmtree}
    new = _output(tmp_path / "reference" / "out", NEW)
    n, failed_steps = 0, []
    while True:
        n += 1
        parent = tmp_path / f"case{n}"
        out = parent / "out"
        old = _output(out, OLD)
        calls = []

        def injected(name):
            def call(*args, **kwargs):
                calls.append(name)
                if len(calls) != n:
                    return originals[name](*args, **kwargs)
                if after:
                    originals[name](*args, **kwargs)
                raise error(f"injected at call {n} ({name})")
            return call

        with monkeypatch.context() as m, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in originals:
                m.setattr(os if name != "rmtree" else shutil, name, injected(name))
            try:
                with staged_folder(out, overwrite=True) as tmp:
                    _write(tmp, NEW)
            except error:
                failed_steps.append(calls[n - 1])
        if len(calls) < n:
            break  # every call has had its turn to fail
        assert _tree(out) in (old, new), f"partial output after a failure at call {n}"
        check_output(out, overwrite=True)  # the next run tidies what the failed one left
        assert os.listdir(parent) == ["out"], n
    assert {"rename", "mkdir"} <= set(failed_steps) and n > 5


def test_undeletable_old_output_does_not_lose_the_new_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _output(out, OLD)
    os.chmod(out / "sub", 0o500)  # read-only subfolder: rmtree fails on it for normal users...
    original = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # ...but tests run as root, where chmod stops nothing, so fail it by hand
        if ".lowbit-old-" in str(path):
            raise PermissionError(13, "Permission denied", str(Path(path) / "sub" / "b.txt"))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match="could not remove the previous output"):
        new = _output(out, NEW)
    assert new[MARKER] and new["a.txt"] == "new a"
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert (leftover / "sub" / "b.txt").read_text() == "old b"
    monkeypatch.setattr(shutil, "rmtree", original)
    os.chmod(leftover / "sub", 0o700)
    check_output(out, overwrite=True)  # the next run removes it
    assert os.listdir(tmp_path) == ["out"] and _tree(out) == new


# --- signals ------------------------------------------------------------------------------------------------------

CHILD = """
import importlib.util, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python process, whatever we inherited
signal.signal(signal.SIGTERM, signal.SIG_DFL)
spec = importlib.util.spec_from_file_location("staging", sys.argv[1])  # no lowbit/__init__: no torch import
staging = importlib.util.module_from_spec(spec)
spec.loader.exec_module(staging)
with staging.staged_folder(sys.argv[2], overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_staging_keeps_old_output_and_dies(tmp_path, sig):
    out = tmp_path / "out"
    old = _output(out, OLD)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, staging.__file__, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "the child never started writing"
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert any(".lowbit-staging-" in p for p in os.listdir(tmp_path))
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -sig  # it still dies of the signal
    assert _tree(out) == old
    assert os.listdir(tmp_path) == ["out"]


def test_handlers_restored_and_threads_work(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with staged_folder(tmp_path / "a"):
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # already unwinds: left alone
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    errors = []

    def write():
        try:
            _output(tmp_path / "b", NEW)
        except Exception as err:  # signal handlers cannot be set outside the main thread
            errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=30)
    assert errors == [] and (tmp_path / "b" / "a.txt").read_text() == "new a"


# --- leftovers of killed runs --------------------------------------------------------------------------------------

def test_stale_leftovers_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    _output(out, OLD)
    dead, live = _dead_pid(), os.getppid()
    stale = [f".out.lowbit-staging-{dead}-deadbeef", f".out.lowbit-old-{dead}-0badcafe"]
    kept = [f".out.lowbit-staging-{live}-12345678",  # its run may still be writing
            f".other.lowbit-staging-{dead}-aaaa0000", ".out.lowbit-staging-notes"]  # not ours to judge
    for name in stale + kept:
        _write(tmp_path / name, {"x.txt": "x"})
    new = _output(out, NEW)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out"])
    assert _tree(out) == new


def test_old_output_of_a_run_killed_mid_swap_is_restored(tmp_path):
    out = tmp_path / "out"
    old = _output(out, OLD)
    dead = _dead_pid()
    os.rename(out, tmp_path / f".out.lowbit-old-{dead}-0badcafe")  # killed after moving the old output aside
    _write(tmp_path / f".out.lowbit-staging-{dead}-deadbeef", {"a.txt": "half"})
    with pytest.raises(OutputExistsError, match="already exists"):  # restored first, so it is not silently replaced
        output_folder(argparse.Namespace(out=str(out), overwrite=False))
    assert _tree(out) == old
    assert os.listdir(tmp_path) == ["out"]
