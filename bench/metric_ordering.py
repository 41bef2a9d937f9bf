"""Do the harness's metrics order the obvious cases? FP, then W8A8, then W4A4, then untrained.

A metric that cannot tell full precision from a crude 4-bit model, or from an untrained one,
measures noise. This evaluates the four on the same prompts and seeds and says, per metric,
whether they come out in that order: strictly, and within sampling noise (alignment is a
fraction of n images, so two models whose fractions differ by less than two standard errors of
the difference are not told apart). The harness's KEPT_METRICS must pass; FID is reported
beside them and is not kept (see bench/fid_guidance.py for why). Writes
bench/results/metric_ordering.md.

    .venv/bin/python bench/metric_ordering.py [--samples 500]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.evaluation.run import markdown, run_eval
from lowbit.evaluation.harness import KEPT_METRICS, alignment_slack, in_order
from lowbit.models.reference import build_reference_model, make_sampler

RECIPES = ("minmax-w8a8", "minmax-w4a4")
REPORTED = {"fid": False, **KEPT_METRICS}


def ordering_table(rows, n: int) -> str:
    """One line per metric: the values (FP, W8A8, W4A4, untrained) and whether they are in order."""
    lines = ["| metric | kept? | values (FP, W8A8, W4A4, untrained) | in order, strictly? | in order within noise? |",
             "| --- | --- | --- | --- | --- |"]
    for metric, higher in REPORTED.items():
        values = [getattr(r, metric) for r in rows]
        values = [float("inf") if v is None else v for v in values]  # FP's PSNR against itself
        slack = None
        if metric.startswith("alignment"):
            slack = [alignment_slack(a, b, n) for a, b in zip(values, values[1:])]
        strict, noisy = in_order(values, higher), in_order(values, higher, slack)
        kept = "yes" if metric in KEPT_METRICS else "no (reported only)"
        lines.append(f"| {metric} | {kept} | {', '.join(f'{v:.4g}' for v in values)} | {'yes' if strict else 'no'} "
                     f"| {'yes' if noisy else 'no'}{' (±2 SE)' if slack else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)  # the untrained model's random weights
    untrained = make_sampler(build_reference_model().eval())
    rows, _ = run_eval(list(RECIPES), args.samples, extra_samplers={"untrained": untrained})
    text = markdown(rows) + "\n\n" + ordering_table(rows, args.samples) + "\n"
    print(text)
    path = Path(__file__).parent / "results" / "metric_ordering.md"
    path.write_text(f"Made by `.venv/bin/python bench/metric_ordering.py --samples {args.samples}`.\n\n{text}")


if __name__ == "__main__":
    main()
