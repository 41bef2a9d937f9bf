"""AdaRound with BRECQ block reconstruction against rounding to nearest: its cost and its effect.

The reference model is quantized at 4-bit weights (per-channel, MSE-searched range) with the
weights rounded to nearest (``mse``) and with the rounding learned block by block
(``adaround``, ``--iterations`` per block), both with the same calibration set and 8-bit
activations; then every model samples the same prompts and seeds with ``lowbit eval``'s
harness. Reports the quantization time (and the reconstruction pass's share) next to PSNR
against the full-precision samples, alignment and FID; writes ``bench/results/adaround.md``.

`.venv/bin/python bench/adaround.py [--iterations 500] [--samples 100] [--calibration-prompts 16]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.evaluation.run import calibrate_reference, run_eval
from lowbit.models.reference import load_reference_model, make_sampler
from lowbit.core.quantize import quantize
from lowbit.recipes import get_recipe

RESULTS = Path(__file__).parent / "results" / "adaround.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500, help="AdaRound iterations per block")
    parser.add_argument("--samples", type=int, default=100, help="images per prompt set (seen, held-out)")
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--bits", default="4,8", help="W,A")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    w, a = (int(b) for b in args.bits.split(","))
    model = load_reference_model()
    calibration = calibrate_reference(model, args.calibration_prompts, progress=False)
    mse = get_recipe(f"mse-w{w}a{a}")
    adaround = get_recipe(f"adaround-w{w}a{a}").with_pass("reconstruct_weights", iterations=args.iterations, samples=8)
    recipes = [mse, adaround]
    samplers, seconds = {}, {}
    for recipe in recipes:
        start = time.perf_counter()
        qmodel = quantize(model, recipe, calibration, progress=False)
        reconstruction = sum(r.seconds for r in qmodel.records if r.name == "reconstruct_weights")
        seconds[recipe.name] = (time.perf_counter() - start, reconstruction)
        samplers[recipe.name] = make_sampler(qmodel)
    rows, _ = run_eval([], args.samples, extra_samplers=samplers, progress=False)
    lines = [f"Reference model, W{w}A{a}, {args.calibration_prompts} calibration prompts x 25 steps, "
             f"{args.iterations} AdaRound iterations per block, {args.samples} images per prompt set.", "",
             "| weights | quantize (s) | of which reconstruction (s) | PSNR vs FP (dB) ↑ | align seen ↑ | align held-out ↑ | FID ↓ | IS ↑ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows[1:]:
        total, reconstruction = seconds[row.model]
        lines.append(f"| {row.model} | {total:.0f} | {reconstruction:.0f} | {row.psnr_vs_fp:.2f} | {row.alignment_seen:.3f} "
                     f"| {row.alignment_heldout:.3f} | {row.fid:.1f} | {row.inception_score:.3f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
