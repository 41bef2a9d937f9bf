"""FraQAT against its baselines on a shipped model, under one step budget and several seeds.

Post-training minmax and AdaRound, then plain QAT at the final bit-width (``qat``), the integer
schedule 8 → 7 → 6 → 5 → 4 (``qat-int``), 16 → 8 → 4 (``qat-halving``) and FraQAT's fractional
schedule (``fraqat``), each trained ``--seeds`` times (the seed orders the training samples) for
``--steps`` steps on the same calibration samples, at the learning rate ``--lr`` for all. Every
model samples the same prompts and seeds with ``lowbit eval``'s harness: PSNR against the
full-precision samples, alignment and FID, per run and as mean ± standard deviation over seeds.
``--methods`` picks a subset. Writes ``bench/results/qat/<model>-w<W>a<A>.md``, the training
histories (``.json``) and the curves of seed 0 (``.png``).

`.venv/bin/python bench/qat.py --bits 3,8 [--model reference|var] [--steps 400] [--seeds 3] [--samples 100] [--lr 3e-5]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lowbit.core.quantize import quantize
from lowbit.evaluation.run import EVAL_MODELS, run_eval
from lowbit.ir.training_history import HISTORY_ARTIFACT
from lowbit.recipes import get_recipe
from lowbit.reports.training_curve import plot_training

RESULTS = Path(__file__).parent / "results" / "qat"
PTQ, QAT = ("minmax", "adaround"), ("qat", "qat-int", "qat-halving", "fraqat")


def _spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]  # a VAR image whose every token survived has no PSNR
    if not values:
        return "—"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,8", help="W,A")
    parser.add_argument("--model", default="reference", choices=("reference", "var"))
    parser.add_argument("--methods", default=",".join(PTQ + QAT), help="comma-separated, from " + ", ".join(PTQ + QAT))
    parser.add_argument("--steps", type=int, default=400, help="training steps (the budget of every QAT run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--samples", type=int, default=100, help="images per prompt set (seen, held-out)")
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, a = (int(b) for b in args.bits.split(","))
    methods = args.methods.split(",")
    subject = EVAL_MODELS[args.model](steps=25, calibration_prompts=args.calibration_prompts, progress=False)
    model, calibration = subject.model, list(subject.calibration)  # the training data: every sampler step's inputs
    samplers, seconds, histories = {}, {}, {}
    for method in (m for m in PTQ if m in methods):
        start = time.perf_counter()
        samplers[method] = subject.sampler(quantize(model, f"{method}-w{w}a{a}", calibration, step_arg=subject.step_arg, progress=False))
        seconds[method] = time.perf_counter() - start
    for method in (m for m in QAT if m in methods):
        recipe = get_recipe(f"{method}-w{w}a{a}")
        for seed in range(args.seeds):
            run = f"{method} seed {seed}"
            trained = recipe.with_settings("train_quantized", qat_steps=args.steps, lr=args.lr, seed=seed)
            start = time.perf_counter()
            qmodel = quantize(model, trained, calibration, step_arg=subject.step_arg, progress=False)
            seconds[run] = time.perf_counter() - start
            samplers[run] = subject.sampler(qmodel)
            histories[run] = qmodel.artifacts[HISTORY_ARTIFACT]
            print(f"{run}: {seconds[run]:.0f} s, final loss {histories[run].loss[-50:].mean():.4g}", flush=True)
    rows, _ = run_eval([], args.samples, calibration_prompts=args.calibration_prompts, extra_samplers=samplers,
                       progress=False, model_name=args.model)
    by_name = {r.model: r for r in rows if r.model in samplers}
    load = os.getloadavg()[0]
    lines = [f"{args.model} at W{w}A{a}: {args.calibration_prompts} calibration prompts, {len(calibration)} sampler steps "
             f"(the training data of every QAT run), {args.steps} training steps at lr {args.lr:g}, {args.seeds} seeds, {args.samples} images per "
             f"prompt set, {args.threads} thread(s). Load average {load:.1f} at the end.", "",
             "| method | runs | quantize + train (s) | PSNR vs FP (dB) ↑ | align seen ↑ | align held-out ↑ | FID ↓ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for method in (m for m in PTQ + QAT if m in methods):
        runs = [n for n in by_name if n == method or n.startswith(f"{method} seed ")]
        column = {k: [getattr(by_name[n], k) for n in runs] for k in ("psnr_vs_fp", "alignment_seen", "alignment_heldout", "fid")}
        summary[method] = column
        lines.append(f"| {method} | {len(runs)} | {statistics.mean(seconds[n] for n in runs):.0f} | {_spread(column['psnr_vs_fp'])} "
                     f"| {_spread([100 * v for v in column['alignment_seen']])} % | "
                     f"{_spread([100 * v for v in column['alignment_heldout']])} % | {_spread(column['fid'])} |")
    lines += ["", "Per run:", "", "| run | PSNR vs FP (dB) | align seen | align held-out | FID | mean loss, last 50 steps |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in by_name.items():
        loss = f"{histories[name].loss[-50:].mean():.3g}" if name in histories else "—"
        psnr = "identical" if row.psnr_vs_fp is None else f"{row.psnr_vs_fp:.2f}"
        lines.append(f"| {name} | {psnr} | {row.alignment_seen:.3f} | {row.alignment_heldout:.3f} | {row.fid:.1f} | {loss} |")
    fraqat, plain = summary.get("fraqat", {"fid": []}), summary.get("qat", {"fid": []})
    if len(fraqat["fid"]) > 1 and len(plain["fid"]) > 1:
        for key, better in (("fid", "lower"), ("psnr_vs_fp", "higher")):
            diff = statistics.mean(fraqat[key]) - statistics.mean(plain[key])
            spread = statistics.stdev(fraqat[key]) + statistics.stdev(plain[key])
            lines.append(f"\nFraQAT − plain QAT, {key}: {diff:+.2f} ({better} is better); the two standard deviations sum to "
                         f"{spread:.2f}, so the difference is {'beyond' if abs(diff) > spread else 'within'} the spread.")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{args.model}-w{w}a{a}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({n: {"bits": h.bits.tolist(), "loss": h.loss.tolist()} for n, h in histories.items()}))
    plot_training({m: histories[f"{m} seed 0"] for m in QAT if f"{m} seed 0" in histories}, stem.with_suffix(".png"),
                  f"{args.model}, W{w}A{a}: distillation loss and weight bit-width (seed 0)")


if __name__ == "__main__":
    main()
