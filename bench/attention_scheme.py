"""DGQ's attention quantizer chosen per layer (``dgq-*-auto``) against min-max and DGQ's log2 grid,
on the random-weight configs of every supported diffusers family; ``minmax-*-auto`` is the choice
alone, without DGQ's groups, and ``dgq-*-g1-auto`` DGQ with one group (the groups' share).

For each family and setting: the SNR (dB) of the quantized denoiser's output against full
precision on held-out inputs at three timesteps (random weights make images meaningless, so no
alignment here; the reference models' table comes from ``lowbit eval``, see the README), and what
``auto`` chose per attention layer. Every cell is the mean over ``--seeds`` draws of the random
weights, and the table counts the draws in which ``auto`` is at least as close to FP as both
min-max and DGQ: one draw is one sample of which errors happen to cancel at the output (at 4-bit
weights a layer's quantizer can move the output's SNR by tenths of a dB either way through its
correlation with the weights' error), so a claim about a family rests on several. Calibration:
``--per-step`` random CFG batches at each timestep. Writes bench/results/dgq_auto/families-calibN.md
(the mean table, then every draw's). ``--choices`` instead writes, for the reference model and its
stressed twin (16 calibration prompts x 25 steps, as ``lowbit eval``), what ``auto`` chose per
layer: each candidate's relative output error and what a per-step choice would have saved
(bench/results/dgq_auto/choices.md).

    .venv/bin/python bench/attention_scheme.py --per-step 16
    .venv/bin/python bench/attention_scheme.py --choices
"""

from __future__ import annotations

import argparse
import collections
import math
from pathlib import Path

import torch

import lowbit
from lowbit.evaluation.run import EVAL_MODELS
from lowbit.ir.attention_schemes import ATTENTION_SCHEMES
from lowbit.models.tiny import TINY_MODELS, build

SETTINGS = ("w8a6", "w4a6")
METHODS = ("minmax", "minmax-auto", "dgq", "dgq-auto", "dgq-g1-auto")
STEPS = (900.0, 500.0, 100.0)


def samples(name: str, seed: int, per_step: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in STEPS:
        for _ in range(per_step):
            kw = TINY_MODELS[name].inputs(2, g)
            kw["timestep"] = torch.full((2,), t / 1000 if name == "flux" else t)
            out.append(((), kw))
    return out


def recipe(method: str, setting: str) -> str:
    base, _, suffix = method.partition("-")
    return f"{base}-{setting}" + (f"-{suffix}" if suffix else "")


def snr_db(model, qmodel, held_out) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for _, kw in held_out:
            ref = model(**kw, return_dict=False)[0]
            out = qmodel(**kw, return_dict=False)[0]
            signal, noise = signal + float(ref.pow(2).sum()), noise + float((out - ref).pow(2).sum())
    return 10 * math.log10(signal / noise)


def choices() -> None:
    lines = []
    for model_name in ("reference", "reference-stressed"):
        subject = EVAL_MODELS[model_name](steps=25, calibration_prompts=16, progress=False)
        # the choice depends on the probabilities' bits only (calibration runs the FP graph): 6 at W8A6 and W4A6
        qmodel = lowbit.quantize(subject.model, "dgq-w8a6-auto", subject.calibration, step_arg=subject.step_arg, progress=False)
        schemes = qmodel.artifacts[ATTENTION_SCHEMES]
        lines += [f"{model_name}, dgq-w8a6-auto and dgq-w4a6-auto (6-bit probabilities): relative output error of each "
                  f"candidate over 25 steps", "",
                  "| layer | start-column mass | " + " | ".join(schemes.candidates) + " | chosen | per-step choice saves |",
                  "|---|---:|" + "---:|" * len(schemes.candidates) + "---|---:|"]
        for i, layer in enumerate(schemes.layers):
            errors = " | ".join("–" if math.isinf(e) else f"{e:.4f}" for e in schemes.relative_errors()[i].tolist())
            mass = float(schemes.start_mass[i])
            saved = max(0.0, 1 - float(schemes.per_step_gain()[i]))  # >= 0 but for float rounding
            lines.append(f"| {layer} | {'–' if math.isnan(mass) else f'{mass:.3f}'} | {errors} | {schemes.chosen[i]} | {saved:.1%} |")
        lines.append("")
        print("\n".join(lines[-len(schemes.layers) - 5:]), flush=True)
    path = Path(__file__).parent / "results" / "dgq_auto" / "choices.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def family_row(name: str, seed: int, per_step: int, held_out_per_step: int) -> tuple[list[float], collections.Counter]:
    """SNR of every recipe (SETTINGS x METHODS) on one weight draw, and what dgq-<first setting>-auto chose."""
    model = build(name, seed)
    calibration, held_out = samples(name, 0, per_step), samples(name, 1, held_out_per_step)
    cells, chose = [], collections.Counter()
    for setting in SETTINGS:
        for method in METHODS:
            qmodel = lowbit.quantize(model, recipe(method, setting), calibration, progress=False)
            cells.append(snr_db(model, qmodel, held_out))
            if method == "dgq-auto" and setting == SETTINGS[0]:
                chose.update(qmodel.artifacts[ATTENTION_SCHEMES].chosen)
    return cells, chose


def auto_holds(cells: list[float]) -> list[bool]:
    """Per setting: is dgq-*-auto at least as close to FP as both min-max and DGQ (to the table's 0.01 dB)?"""
    column = {m: i for i, m in enumerate(METHODS)}
    held = []
    for k in range(len(SETTINGS)):
        row = cells[k * len(METHODS):(k + 1) * len(METHODS)]
        auto = round(row[column["dgq-auto"]], 2)
        held.append(auto >= round(row[column["minmax"]], 2) and auto >= round(row[column["dgq"]], 2))
    return held


def table(rows: dict[str, list[list[float]]], extra: dict[str, str], extra_title: str) -> list[str]:
    header = [recipe(m, s) for s in SETTINGS for m in METHODS] + [f"auto >= both, {s} (draws)" for s in SETTINGS]
    lines = ["| family | " + " | ".join(header) + f" | {extra_title} |",
             "| --- | " + " | ".join("---:" for _ in header) + " | --- |"]
    for name, draws in rows.items():
        mean = torch.tensor(draws, dtype=torch.float64).mean(0).tolist()
        holds = [sum(h) for h in zip(*(auto_holds(d) for d in draws))]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in mean) + " | "
                     + " | ".join(f"{h}/{len(draws)}" for h in holds) + f" | {extra[name]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-step", type=int, default=16, help="calibration batches (of 2) per timestep")
    parser.add_argument("--held-out", type=int, default=4, help="held-out batches (of 2) per timestep")
    parser.add_argument("--seeds", type=int, default=5, help="random-weight draws per family")
    parser.add_argument("--choices", action="store_true", help="what auto chose on the reference models, per layer")
    args = parser.parse_args()
    if args.choices:
        return choices()
    draws = []  # (family, seed, cells, what dgq-<first setting>-auto chose)
    for name in TINY_MODELS:
        for seed in range(args.seeds):
            cells, chosen = family_row(name, seed, args.per_step, args.held_out)
            draws.append((name, seed, cells, chosen))
            print(f"{name} seed {seed}: " + " ".join(f"{c:.2f}" for c in cells), flush=True)
    counted = lambda chosen: ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))  # noqa: E731
    lines = table({name: [cells for family, _, cells, _ in draws if family == name] for name in TINY_MODELS},
                  {name: counted(sum((c for family, _, _, c in draws if family == name), collections.Counter()))
                   for name in TINY_MODELS}, f"auto chose (layers, {args.seeds} draws)")
    print("\n".join(lines), flush=True)
    every = table({f"{name} (seed {seed})": [cells] for name, seed, cells, _ in draws},
                  {f"{name} (seed {seed})": counted(chosen) for name, seed, _, chosen in draws}, "auto chose (layers)")
    path = Path(__file__).parent / "results" / "dgq_auto" / f"families-calib{args.per_step}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("SNR (dB) of the denoiser output vs full precision on held-out inputs (higher is better); random-weight "
                    f"configs, calibrated on {args.per_step} random CFG batches per timestep (900/500/100), measured on "
                    f"{args.held_out} held-out batches per timestep; mean over {args.seeds} weight draws (seeds 0-"
                    f"{args.seeds - 1}). 'auto >= both' counts the draws where dgq-*-auto is at least as close to FP as "
                    f"min-max and DGQ; 'auto chose' counts the candidates dgq-{SETTINGS[0]}-auto picked.\n\n"
                    + "\n".join(lines) + "\n\nEvery draw:\n\n" + "\n".join(every) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
