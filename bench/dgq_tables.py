"""DGQ's Table 2 and Table 3 in kind, on the shipped reference model, with ``lowbit eval``'s harness.

Table 2: full precision, the per-tensor min-max baseline and DGQ with K = 8 and 16 groups at
W8A8, W8A6, W4A8 and W4A6 — FID, IS, alignment on seen and held-out phrasings, PSNR against
the full-precision samples, BOPs and size.

Table 3 (at ``--bits``, W8A8 as in the paper): (a) group quantization alone (K = 8), attention
quantization alone (log2 + start-token split + dynamic scale) and both; (b) K in {1, 2, 4, 8, 16}
with and without dimension selection (eq. 4-5), attention quantization off.

Each table is one run, every model on the same prompts and seeds. The sizes (images per prompt
set, calibration prompts) are arguments because 2 CPU cores make full-size runs long; the README
states the ones used.

`.venv/bin/python bench/dgq_tables.py --table 2 --samples 100 --calibration-prompts 32`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.evaluate import EVAL_MODELS, markdown, run_eval
from lowbit.recipes import Recipe, dgq

RESULTS = Path(__file__).parent / "results"
SETTINGS = ((8, 8), (8, 6), (4, 8), (4, 6))
GROUPS = (1, 2, 4, 8, 16)


def table2() -> list[Recipe]:
    out = []
    for w, a in SETTINGS:
        out += [Recipe(f"minmax-w{w}a{a}", w, a), dgq(w, a, 8), dgq(w, a, 16)]
    return out


def table3(w: int, a: int) -> list[Recipe]:
    attention = dict(attention_scheme="log2", start_token=True, dynamic_attention_scale=True)
    out = [Recipe(f"baseline w{w}a{a}", w, a),
           Recipe("(a) groups alone, K=8", w, a, groups=8),
           Recipe("(a) attention alone", w, a, **attention),
           Recipe("(a) both", w, a, groups=8, **attention)]
    for select in (True, False):
        out += [Recipe(f"(b) K={k}, {'with' if select else 'without'} dim selection", w, a, groups=k, select_dim=select)
                for k in GROUPS]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=int, choices=(2, 3), required=True)
    parser.add_argument("--samples", type=int, default=100, help="images per prompt set (seen, held-out)")
    parser.add_argument("--calibration-prompts", type=int, default=32)
    parser.add_argument("--bits", default="8,8", help="W,A of the Table 3 ablation")
    parser.add_argument("--model", default="reference", choices=list(EVAL_MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    w, a = (int(b) for b in args.bits.split(","))
    recipes = table2() if args.table == 2 else table3(w, a)
    start = time.perf_counter()
    rows, _ = run_eval(recipes, args.samples, calibration_prompts=args.calibration_prompts, model_name=args.model)
    minutes = (time.perf_counter() - start) / 60
    text = (f"{args.model}, {args.samples} images per prompt set, {args.calibration_prompts} calibration prompts x 25 steps, "
            f"{minutes:.0f} min:\n\n{markdown(rows)}\n")
    print(text)
    suffix = "" if args.table == 2 else f"_w{w}a{a}"
    (RESULTS / f"dgq_table{args.table}{suffix}_{args.model}.md").write_text(text)


if __name__ == "__main__":
    main()
