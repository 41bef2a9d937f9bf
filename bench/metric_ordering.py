"""Do the harness's metrics order the obvious cases? FP, then W8A8, then W4A4, then untrained.

A metric that cannot tell full precision from a crude 4-bit model, or from an untrained one,
measures noise. This evaluates the four on the same prompts and seeds and says, per metric,
whether they come out in that order (ties allowed). Writes bench/results/metric_ordering.md.

    .venv/bin/python bench/metric_ordering.py [--samples 500]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.evaluate import markdown, run_eval
from lowbit.models.reference import build_reference_model, make_sampler

RECIPES = ("minmax-w8a8", "minmax-w4a4")
HIGHER_IS_BETTER = {"fid": False, "inception_score": True, "alignment_seen": True, "alignment_heldout": True, "psnr_vs_fp": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)  # the untrained model's random weights
    untrained = make_sampler(build_reference_model().eval())
    rows, _ = run_eval(list(RECIPES), args.samples, extra_samplers={"untrained": untrained})
    lines = [markdown(rows), "", "| metric | values (FP, W8A8, W4A4, untrained) | in order? |", "| --- | --- | --- |"]
    for metric, higher in HIGHER_IS_BETTER.items():
        values = [getattr(r, metric) for r in rows]
        values = [float("inf") if v is None else v for v in values]  # FP's PSNR against itself
        quality = values if higher else [-v for v in values]
        ordered = all(a >= b for a, b in zip(quality, quality[1:]))
        lines.append(f"| {metric} | {', '.join(f'{v:.4g}' for v in values)} | {'yes' if ordered else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    path = Path(__file__).parent / "results" / "metric_ordering.md"
    path.write_text(f"Made by `.venv/bin/python bench/metric_ordering.py --samples {args.samples}`.\n\n{text}")


if __name__ == "__main__":
    main()
