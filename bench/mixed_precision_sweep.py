"""How much budget does mixed precision need to bring W4A8 near W8A8? A sweep of the assignment.

One calibration and one sensitivity analysis per grouping (each layer type, each single layer);
then the assignment at every budget, each mixed recipe evaluated like ``lowbit eval`` does (PSNR
and identical images vs full precision, alignment), beside the uniform recipe and the ceiling
(W8A8). Writes ``sweep.md`` and ``sweep.png`` (PSNR vs FP against the BOPs the recipe costs)
under bench/results/mixed_precision_sweep/<model>-<recipe>/.

    .venv/bin/python bench/mixed_precision_sweep.py --model var --recipe litevar-w4a8 --ceiling litevar-w8a8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.core.quantize import calibrate
from lowbit.evaluation.run import EVAL_MODELS, run_eval
from lowbit.recipes.builtin import get_recipe
from lowbit.reports.mixed_precision import assign
from lowbit.reports.sensitivity import measure


def plot(points: dict[str, list[tuple[float, float]]], uniform: float, ceiling: tuple[float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for by, xy in points.items():
        xs, ys = zip(*sorted(xy))
        ax.plot((1.0,) + xs, (uniform,) + ys, marker="o", label=f"raised per {by}")
    ax.scatter([ceiling[0]], [ceiling[1]], marker="*", s=160, color="black", zorder=5, label="W8A8 everywhere")
    ax.axhline(ceiling[1], color="black", lw=0.6, ls=":")
    ax.set_xlabel("BOPs, times the uniform recipe's")
    ax.set_ylabel("PSNR vs full precision (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EVAL_MODELS), default="var")
    parser.add_argument("--recipe", default="litevar-w4a8")
    parser.add_argument("--ceiling", default="litevar-w8a8", help="the uniform higher-precision recipe to approach")
    parser.add_argument("--budgets", default="1.1,1.25,1.5,2,3")
    parser.add_argument("--by", default="type,layer")
    parser.add_argument("--samples", type=int, default=200, help="images per prompt set in the evaluation")
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    recipe = get_recipe(args.recipe)
    subject = EVAL_MODELS[args.model](steps=args.steps, calibration_prompts=args.calibration_prompts, progress=True)
    calibrated = calibrate(subject.model, recipe, subject.calibration, step_arg=subject.step_arg, keep=8)
    mixed = {}
    for by in args.by.split(","):
        rows = measure(calibrated, by)
        for budget in (float(b) for b in args.budgets.split(",")):
            m = assign(calibrated, rows, budget=budget)
            name = f"{recipe.name}-{by}-mp{budget:g}x"
            mixed[name] = (by, budget, len(m.raised), m.recipe)
    ceiling = get_recipe(args.ceiling)
    recipes = [recipe, ceiling] + [r.__class__.from_dict({**r.to_dict(), "name": name}) for name, (*_, r) in mixed.items()]
    rows, _ = run_eval(recipes, args.samples, steps=args.steps, calibration_prompts=args.calibration_prompts, model_name=args.model)
    by_name = {r.model: r for r in rows}

    out = Path(__file__).parent / "results" / "mixed_precision_sweep" / f"{args.model}-{recipe.name}"
    out.mkdir(parents=True, exist_ok=True)
    ratio = {name: r.gbops / by_name[recipe.name].gbops for name, r in by_name.items()}  # BOPs per image, as lowbit eval counts
    lines = [f"{args.model}: {recipe.name} with its most sensitive groups raised to W8A8 within each budget, against "
             f"{ceiling.name}; {args.samples} images per prompt set, {args.calibration_prompts} calibration prompts.",
             "", "| recipe | raised per | budget | BOPs vs uniform | groups raised | PSNR vs FP (dB) | same image as FP | align seen | align held-out |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def line(name: str, by: str, budget: str, raised: str) -> str:
        r = by_name[name]
        return (f"| {name} | {by} | {budget} | {ratio[name]:.3f} | {raised} | {r.psnr_vs_fp:.2f} | {r.same_as_fp:.3f} | "
                f"{r.alignment_seen:.3f} | {r.alignment_heldout:.3f} |")

    lines.append(line(recipe.name, "–", "1", "0"))
    for name, (by, budget, raised, _) in mixed.items():
        lines.append(line(name, by, f"{budget:g}", str(raised)))
    lines.append(line(ceiling.name, "–", "–", "all"))
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    points: dict[str, list[tuple[float, float]]] = {}
    for name, (by, *_) in mixed.items():
        points.setdefault(by, []).append((ratio[name], by_name[name].psnr_vs_fp))
    plot(points, by_name[recipe.name].psnr_vs_fp, (ratio[ceiling.name], by_name[ceiling.name].psnr_vs_fp), out / "sweep.png",
         f"{args.model}: {recipe.name}, sensitive groups raised to W8A8")
    print("\n".join(lines))
    print(f"wrote {out}/sweep.md, {out}/sweep.png")


if __name__ == "__main__":
    main()
