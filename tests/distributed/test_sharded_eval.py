"""``lowbit eval`` under torchrun prints the table one process prints (issue: scale out, done 2)."""

import csv
from pathlib import Path

from lowbit.cli.main import main
from tests.distributed.launch import torchrun

# 60 images in batches of 50: the two processes sample unequal shares; 32 prompts are two calibration chunks
EVAL = ["eval", "--model", "reference", "--recipe", "minmax-w8a8", "--samples", "60", "--steps", "3",
        "--calibration-prompts", "32"]


def _table(folder: Path) -> list[dict]:
    """The rows of eval.csv without the wall-clock column."""
    with open(folder / "eval.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_two_processes_print_the_table_of_one(tmp_path):
    run = torchrun("-m", "lowbit", *EVAL, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| minmax-w8a8 |") == 1  # one process reports
    assert main([*EVAL, "--out", str(tmp_path / "one")]) == 0
    one, two = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert [r["model"] for r in one] == ["full precision", "minmax-w8a8"]
    assert two == one


def test_a_command_that_does_not_shard_refuses_torchrun():
    run = torchrun("-m", "lowbit", "recipes")
    assert run.returncode != 0
    assert "'lowbit recipes' runs in one process: launch it without torchrun" in run.stderr
