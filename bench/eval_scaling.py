"""Wall-clock of ``lowbit eval`` in one process and in several under ``torchrun``, on this machine.

Each configuration runs the same command (the same recipes, samples, steps and seeds) as its own
launch, in rounds that alternate the configurations so that a change in the machine's load falls
on all of them; the table gives the median wall-clock per configuration and its speed-up over one
process with every core as intra-op threads (what a user gets without torchrun). It also checks
that every launch printed the same quality columns as the first one.

On a machine with C cores, ``torchrun --nproc-per-node P`` gives each process C/P threads
(``OMP_NUM_THREADS``), so the configurations compare splitting the cores between processes with
giving them all to one.

`.venv/bin/python bench/eval_scaling.py`  (writes bench/results/eval_scaling.md)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compile_cpu import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "eval_scaling.md"
ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int, threads: int, eval_args: list[str], out: Path) -> float:
    """Seconds for one ``lowbit eval`` launch (process start, model load and all) writing to ``out``."""
    lowbit = ["-m", "lowbit", "eval", *eval_args, "--out", str(out), "--overwrite"]
    prefix = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, *prefix, *lowbit], cwd=ROOT, check=True, capture_output=True,
                   env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def quality(out: Path) -> list[dict]:
    with open(out / "eval.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", default=None, help="default: minmax-w8a8 and dgq-w8a8")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    recipes = args.recipe or ["minmax-w8a8", "dgq-w8a8"]
    eval_args = [a for r in recipes for a in ("--recipe", r)] + [
        "--samples", str(args.samples), "--steps", str(args.steps), "--calibration-prompts", str(args.calibration_prompts)]
    configs = [(1, cores), (1, 1)] + [(p, max(1, cores // p)) for p in (2, 4) if p <= cores]
    seconds: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    load = []
    reference, same = None, True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for processes, threads in configs:
                load.append(os.getloadavg()[0])
                out = Path(tmp) / f"p{processes}t{threads}"
                seconds[(processes, threads)].append(launch(processes, threads, eval_args, out))
                reference = reference or quality(out)
                same &= quality(out) == reference
                print(f"round {r + 1}: {processes} process(es) x {threads} thread(s): {seconds[(processes, threads)][-1]:.0f} s",
                      flush=True)
    base = statistics.median(seconds[configs[0]])
    lines = [
        f"`lowbit eval --model reference {' '.join(eval_args)}`, {args.rounds} rounds, median wall-clock per launch.",
        f"Machine: {cpu_name()}, {cores} cores; load average at launches {min(load):.2f}-{max(load):.2f}.",
        f"Every launch printed the same quality columns: {'yes' if same else 'NO'}.",
        "",
        "| processes | threads each | wall-clock (s) | speed-up vs 1 process, all cores |",
        "|---:|---:|---:|---:|",
    ]
    for c in configs:
        median = statistics.median(seconds[c])
        lines.append(f"| {c[0]} | {c[1]} | {median:.0f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
