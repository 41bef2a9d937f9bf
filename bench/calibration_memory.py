"""Peak memory of calibration for 16 and 64 prompts, side by side.

Calibration statistics are streaming (per-channel and per-token min/max per timestep), so their
memory depends on the model, not on how many prompts are seen. This bench quantizes the
reference model with ``dgq-w8a8`` from 16 and from 64 calibration prompts (25 steps each), each
run in a fresh process, in two ways:

- **streamed**: ``ReferenceCalibration`` samples 16 prompts at a time and ``lowbit.quantize``
  reads each denoiser input once; nothing but the statistics outlives a chunk;
- **recorded**: ``calibrate_reference`` keeps every denoiser input in a list first, one CFG batch
  of all prompts per step (what ``record_denoiser_inputs`` gives for a pipeline, and what
  ``lowbit eval`` did before it streamed).

It reports the process's peak resident memory above what it held before calibration began
(``ru_maxrss``), and writes ``bench/results/calibration_memory.md``.

`.venv/bin/python bench/calibration_memory.py`
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "calibration_memory.md"
PROMPTS = (16, 64)
MODES = ("streamed", "recorded")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(mode: str, prompts: int, steps: int) -> dict:
    """One calibration in this process; peak memory above the starting point, in MB."""
    import torch

    from lowbit.evaluation.run import ReferenceCalibration, calibrate_reference
    from lowbit.models import text_encoder
    from lowbit.models.reference import load_reference_model
    from lowbit.core.quantize import quantize

    torch.set_num_threads(2)
    model = load_reference_model()
    text_encoder.encode(["warm-up"])  # load the text encoder before measuring
    before = _rss_mb()
    start = time.perf_counter()
    source = ReferenceCalibration(model, prompts, steps, progress=False) if mode == "streamed" else calibrate_reference(
        model, prompts, steps, progress=False)
    quantize(model, "dgq-w8a8", source, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "prompts": prompts, "before_mb": before, "peak_mb": peak, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps)))
        return
    rows = {}
    for mode in MODES:
        for prompts in PROMPTS:
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", mode, str(prompts)],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode, prompts] = json.loads(out.strip().splitlines()[-1])
            print(rows[mode, prompts], flush=True)
    lines = [f"Peak resident memory above the pre-calibration level while quantizing the reference model with "
             f"dgq-w8a8 ({args.steps} sampling steps per prompt, classifier-free guidance doubling the batch); "
             f"one fresh process per cell.", "",
             "| calibration | " + " | ".join(f"{p} prompts: peak (MB)" for p in PROMPTS) + " | "
             + " | ".join(f"{p} prompts: time (s)" for p in PROMPTS) + " |",
             "|---|" + "---:|" * 2 * len(PROMPTS)]
    for mode in MODES:
        peaks = [rows[mode, p]["peak_mb"] - rows[mode, p]["before_mb"] for p in PROMPTS]
        times = [rows[mode, p]["seconds"] for p in PROMPTS]
        lines.append(f"| {mode} | " + " | ".join(f"{v:.0f}" for v in peaks) + " | " + " | ".join(f"{t:.0f}" for t in times) + " |")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
