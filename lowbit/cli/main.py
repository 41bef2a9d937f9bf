"""The ``lowbit`` command line.

``lowbit quantize`` runs the main job on a model that ships with the project: it records
calibration inputs from a diffusers pipeline, quantizes the denoiser with a recipe (a built-in
name or a TOML file), runs the pipeline with the quantized denoiser in place, prints the
per-layer report, and writes the quantized model, the report (CSV and JSON) and a picture of
full-precision against quantized samples. All outputs appear together or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowbit.cli.arguments import at_least, positive_int
from lowbit.cli.qnn import add_commands as add_qnn_commands
from lowbit.core.calibration import DenoiserInputStream
from lowbit.core.distributed import DistributedError, first_rank_only, is_distributed, launched, rank, shard, world_size
from lowbit.core.qat import with_checkpoints
from lowbit.core.quantize import quantize
from lowbit.core.serialization import save
from lowbit.core.staging import OutputExistsError, add_output_arguments, output_folder, staged_folder
from lowbit.evaluation.grid import save_grid
from lowbit.ir.training_history import HISTORY_ARTIFACT
from lowbit.passes import PassError
from lowbit.recipes import RecipeError, get_recipe, recipes
from lowbit.reports.layer_report import format_table, layer_report, write_csv, write_json
from lowbit.reports.training_curve import plot_training

__all__ = ["main"]


def _cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.models.pipelines import pipeline_calls, tiny_pipeline

    out = first_rank_only(lambda: output_folder(args))
    checkpoints = Path(args.checkpoints) if args.checkpoints else out.with_name(out.name + ".checkpoints")
    recipe = with_checkpoints(get_recipe(args.recipe), checkpoints)
    pipe = tiny_pipeline(args.model)
    denoiser_attr = "transformer" if args.model == "pixart" else "unet"
    denoiser = getattr(pipe, denoiser_attr)
    if rank() == 0:
        print(f"lowbit: {args.model} ({type(denoiser).__name__}, "
              f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters), recipe {recipe.name}")
    # memory: one prompt's inputs; under torchrun each process calibrates on every n-th prompt
    calib = DenoiserInputStream(pipe, shard(pipeline_calls(args.model, args.prompts, args.steps, seed=0), "calibration prompts"))
    qmodel = quantize(denoiser, recipe, calib)
    if rank() != 0:  # the same model on every process; the first one reports (its errors on its own shard) and writes
        return 0
    for record in qmodel.records:
        print("  pass", record.summary())
    rows = layer_report(qmodel, calib)
    print(format_table(rows))
    # fresh, identically seeded calls (their generators are consumed by a run) for both models: same noise
    fp_images = torch.cat([pipe(**call).images for call in pipeline_calls(args.model, args.samples, args.steps, seed=1000)])
    setattr(pipe, denoiser_attr, qmodel)
    q_images = torch.cat([pipe(**call).images for call in pipeline_calls(args.model, args.samples, args.steps, seed=1000)])
    rel = float((q_images - fp_images).norm() / fp_images.norm())
    print(f"lowbit: {args.samples} pipeline samples, relative L2 difference quantized vs full precision: {rel:.4f}")

    with staged_folder(out, overwrite=args.overwrite) as tmp:
        save(qmodel, tmp / "model")
        write_csv(rows, tmp / "report.csv")
        write_json(rows, tmp / "report.json")
        save_grid({"full precision": fp_images * 2 - 1, recipe.name: q_images * 2 - 1}, tmp / "samples.png")
        trained = HISTORY_ARTIFACT in qmodel.artifacts
        if trained:
            plot_training({recipe.name: qmodel.artifacts[HISTORY_ARTIFACT]}, tmp / "training.png",
                          f"{args.model}, {recipe.name}: quantization-aware training")
    print(f"lowbit: wrote {out}/model, {out}/report.csv, {out}/report.json, {out}/samples.png"
          + (f", {out}/training.png (training checkpoints in {checkpoints})" if trained else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.evaluation.run import markdown, run_eval, write_results

    out = first_rank_only(lambda: output_folder(args))
    rows, grid = run_eval([get_recipe(r) for r in args.recipe], args.samples, seed=args.seed,
                          steps=args.steps, calibration_prompts=args.calibration_prompts, model_name=args.model)
    if rank() != 0:  # every process holds the same table; the first one reports it
        return 0
    print(markdown(rows))
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        write_results(rows, grid, tmp)
    print(f"lowbit: wrote {out}/eval.csv, {out}/eval.md, {out}/samples.png")
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from lowbit.core.quantize import calibrate
    from lowbit.evaluation.run import EVAL_MODELS
    from lowbit.reports.mixed_precision import assign, check_request
    from lowbit.reports.sensitivity import markdown, measure, plot, write_csv

    recipe = get_recipe(args.recipe)
    check_request(args.budget, args.raise_to)
    out = first_rank_only(lambda: output_folder(args))
    subject = EVAL_MODELS[args.model](steps=args.steps, calibration_prompts=args.calibration_prompts, progress=True)
    calibrated = calibrate(subject.model, recipe, subject.calibration, step_arg=subject.step_arg, keep=args.samples)
    rows = measure(calibrated, args.by)
    mixed = assign(calibrated, rows, budget=args.budget, metric=args.metric, raise_to=args.raise_to)
    if rank() != 0:
        return 0
    table = markdown(rows)
    print(table)
    print(f"lowbit: {mixed.summary()}")
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        write_csv(rows, tmp / "sensitivity.csv")
        (tmp / "sensitivity.md").write_text(f"{args.model}, {recipe.name}, per {args.by}, {len(calibrated.samples)} samples\n\n"
                                            f"{table}\n\n{mixed.summary()}\n")
        plot(rows, tmp / "sensitivity.png", f"{args.model}: each {args.by} alone at {recipe.name}", mixed.raised)
        (tmp / "mixed.toml").write_text(mixed.recipe.to_toml())
    print(f"lowbit: wrote {out}/sensitivity.csv, {out}/sensitivity.md, {out}/sensitivity.png, {out}/mixed.toml")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from lowbit.evaluation.run import DIFFUSION_MODELS
    from lowbit.evaluation.figures import make_figures

    out = output_folder(args)
    model = DIFFUSION_MODELS[args.model]()
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        paths = make_figures(model, args.layer, tmp, attention=args.attention, label=args.model,
                             prompts=args.prompts, steps=args.steps, step=args.step)
    print("lowbit: wrote " + ", ".join(str(out / p.name) for p in paths))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    if args.show:
        print(get_recipe(args.show).to_toml(), end="")
        return 0
    for name in recipes():
        r = get_recipe(name)
        passes = " > ".join(s.name for s in r.passes)
        print(f"{name:16s} W{r.precision.weight_bits:g}A{r.precision.activation_bits:g}  {passes}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from lowbit.evaluation.run import DIFFUSION_MODELS, EVAL_MODELS
    from lowbit.models.pipelines import PIPELINE_MODELS

    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a shipped model's denoiser, run it in its pipeline, report per layer")
    q.add_argument("--model", default="pixart", choices=PIPELINE_MODELS, help="the model to quantize")
    q.add_argument("--recipe", default="minmax-w8a8", help="a built-in recipe name (see 'lowbit recipes') or a .toml file")
    q.add_argument("--prompts", type=positive_int, default=8, help="calibration prompts")
    q.add_argument("--steps", type=at_least(2, "diffusers' pipelines take a single step for a one-step (distilled) model"),
                   default=25, help="denoising steps per prompt (DGQ uses 25)")
    q.add_argument("--samples", type=positive_int, default=4, help="images generated for the comparison picture")
    q.add_argument("--checkpoints", default="", help="where a training recipe (fraqat-*, qat-*) keeps its checkpoints and "
                   "resumes from them (default: beside --out, <out>.checkpoints)")
    add_output_arguments(q, "out/quantize")
    q.set_defaults(func=_cmd_quantize, sharded=True)
    e = sub.add_parser("eval", help="full precision and recipes side by side on a shipped model")
    e.add_argument("--model", default="reference", choices=list(EVAL_MODELS),
                   help="the shipped reference model, the same function with planted channel outliers "
                        "(lowbit/models/stress.py), or the shipped VAR (sampled at lowbit.models.var.PROTOCOL)")
    e.add_argument("--recipe", action="append", default=[], help="a recipe name or .toml file; repeat for several")
    e.add_argument("--samples", type=positive_int, default=1000, help="images per prompt set (seen and held-out phrasings)")
    e.add_argument("--seed", type=int, default=0, help="prompt and noise seed")
    e.add_argument("--steps", type=positive_int, default=25, help="sampling steps (DGQ uses 25; VAR takes one per scale)")
    e.add_argument("--calibration-prompts", type=positive_int, default=64, help="calibration prompts or classes (DGQ uses 64)")
    add_output_arguments(e, "out/eval")
    e.set_defaults(func=_cmd_eval, sharded=True)
    s = sub.add_parser("sensitivity", help="each layer type (or layer) quantized alone; a mixed recipe within a budget")
    s.add_argument("--model", default="reference", choices=list(EVAL_MODELS), help="the shipped model to analyse")
    s.add_argument("--recipe", default="minmax-w4a8", help="the low recipe: a built-in name or a .toml file")
    s.add_argument("--by", default="type", choices=("type", "layer"),
                   help="group layers by type (block indices as *, e.g. blocks.*.ffn.fc2) or take each layer alone")
    s.add_argument("--budget", type=float, default=1.1, help="the mixed recipe's cost, times the uniform recipe's")
    s.add_argument("--metric", default="bops", choices=("bops", "size"), help="the cost the budget bounds")
    s.add_argument("--raise-to", default="w8a8", help="the setting sensitive groups get: wXaY (w8a8, w8a16) or float")
    s.add_argument("--samples", type=positive_int, default=8, help="calibration samples the errors are measured on")
    s.add_argument("--steps", type=positive_int, default=25, help="sampling steps (VAR takes one per scale)")
    s.add_argument("--calibration-prompts", type=positive_int, default=16, help="calibration prompts or classes")
    add_output_arguments(s, "out/sensitivity")
    s.set_defaults(func=_cmd_sensitivity, sharded=True)
    f = sub.add_parser("figures", help="DGQ Figures 4 and 5 for one layer: activation heatmap, attention histogram (PNG)")
    f.add_argument("--layer", required=True, help="a linear layer whose input is pictured, e.g. transformer_blocks.2.attn1.to_q")
    f.add_argument("--attention", default=None, help="the cross-attention to histogram (default: attn2 of the layer's block)")
    f.add_argument("--model", default="reference", choices=list(DIFFUSION_MODELS), help="the model to picture")
    f.add_argument("--prompts", type=positive_int, default=4, help="prompts sampled (seen phrasings)")
    f.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    f.add_argument("--step", type=int, default=None, help="the step whose activation is pictured (default: the middle one)")
    add_output_arguments(f, "out/figures")
    f.set_defaults(func=_cmd_figures)
    r = sub.add_parser("recipes", help="list the built-in recipes, or print one as TOML")
    r.add_argument("--show", metavar="RECIPE", help="print this recipe (a name or a .toml file) with every pass it runs")
    r.set_defaults(func=_cmd_recipes)
    add_qnn_commands(sub)  # export --target qnn-htp, verify-qnn
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Launched by torchrun, the commands that shard their work (``eval``, ``quantize``,
    ``sensitivity``) split it over the processes and the first one writes the outputs; the others refuse."""
    args = _parser().parse_args(argv)
    try:
        with launched():
            if is_distributed() and not getattr(args, "sharded", False):
                raise ValueError(f"'lowbit {args.command}' runs in one process: launch it without torchrun "
                                 f"(it was launched as {world_size()} processes); 'lowbit eval', 'quantize' and 'sensitivity' shard their work")
            return args.func(args)
    except (RecipeError, PassError, ValueError, OutputExistsError, DistributedError) as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
