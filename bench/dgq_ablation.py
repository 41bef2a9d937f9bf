"""DGQ's Table 3 in kind on the shipped reference model, with ``lowbit eval``'s harness.

(a) group quantization alone (K = 8, eq. 4-7), attention quantization alone (log2 + start-token
split + dynamic scale, eq. 2, 8-9) and both; (b) K in {1, 2, 4, 8, 16} with and without
dimension selection (eq. 4-5; without it, groups run along channels), attention quantization
off; (c) each of the attention part's three switches alone (eq. 2, 9, 8), to find which one costs. Every model samples the same prompts and seeds. The paper ablates at W8A8; on this model
W8A8 is within sampling noise of full precision for every recipe (Table 2), so the default is
W8A6, where the parts have something to fix. (DGQ's Table 2 itself is one ``lowbit eval``
command; the README gives it.)

`.venv/bin/python bench/dgq_ablation.py [--bits 8,6] [--samples 200] [--model reference]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.evaluation.run import EVAL_MODELS, markdown, run_eval
from lowbit.recipes import Recipe

RESULTS = Path(__file__).parent / "results"
GROUPS = (1, 2, 4, 8, 16)


def _groups(recipe: Recipe, k: int, select_dim: bool = True) -> Recipe:
    """DGQ's group quantization (eq. 6-7), along the outlier dimension of eq. 4-5 if ``select_dim``."""
    recipe = recipe.with_pass("detect_outlier_dim") if select_dim else recipe
    return recipe.with_pass("group_activations", groups=k, select_dim=select_dim)


def ablation(w: int, a: int) -> list[Recipe]:
    base = lambda name, **precision: Recipe.build(name, w, a, **precision)  # noqa: E731
    log2 = dict(attention_scheme="log2", dynamic_attention_scale=True)
    out = [_groups(base("(a) groups alone, K=8"), 8),
           base("(a) attention alone", **log2).with_pass("split_start_token"),
           _groups(base("(a) both (dgq)", **log2).with_pass("split_start_token"), 8)]
    for select in (True, False):
        out += [_groups(base(f"(b) K={k}, {'with' if select else 'without'} dim selection"), k, select) for k in GROUPS]
    out += [base("(c) log2 alone", attention_scheme="log2"),
            base("(c) start-token split alone").with_pass("split_start_token"),
            base("(c) dynamic scale alone", dynamic_attention_scale=True)]
    return [base(f"minmax-w{w}a{a}")] + out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8,6", help="W,A")
    parser.add_argument("--samples", type=int, default=200, help="images per prompt set (seen, held-out)")
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--model", default="reference", choices=list(EVAL_MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    w, a = (int(b) for b in args.bits.split(","))
    start = time.perf_counter()
    rows, _ = run_eval(ablation(w, a), args.samples, calibration_prompts=args.calibration_prompts, model_name=args.model)
    text = (f"Made by `.venv/bin/python bench/dgq_ablation.py --bits {w},{a} --samples {args.samples} --model {args.model}` "
            f"({args.calibration_prompts} calibration prompts x 25 steps; {(time.perf_counter() - start) / 60:.0f} min).\n\n"
            f"{markdown(rows)}\n")
    print(text)
    (RESULTS / f"dgq_ablation_w{w}a{a}_{args.model}.md").write_text(text)


if __name__ == "__main__":
    main()
