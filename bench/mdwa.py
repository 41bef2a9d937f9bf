"""LiteVAR's attention savings — multi-diagonal windows (MDWA) and sharing across CFG (ASC) — on the
shipped VAR (Tables 1 and 3 in kind) and on the PixArt reference model.

``--table`` evaluates the windows alone (nothing quantized) at LiteVAR Table 1's ratios R0, once
with LiteVAR's rule of keeping the first three key parts whole and once keeping only the first
(the shipped VAR has four scales, so LiteVAR's rule leaves only the last scale's own part to
window). ``--ablation`` is Table 3 in kind: full precision, MDWA, MDWA + ASC, + W4A8, + W4A8 with
the mixed-precision recipe of ``lowbit sensitivity``; ``--deployed`` adds LiteVAR's own composition
(``litevar-w4a8-mp``: its Fig. 5's ``ffn.fc2`` layers in floating point) beside the same without
them. ``--pixart`` runs ASC (every layer, and
DiTFastAttn's rule at a threshold) and MDWA on the reference model, whose calls have one key part
each, so a band window there runs over the raster order of the tokens. ``--grid`` repeats Table 1
(first part whole) and the reference model's MDWA rows with 2-D windows (``geometry="grid"``: a
square around the query's position in each scale's or the image's token grid).
Each row is ``lowbit eval``'s: FID, IS, alignment, PSNR against the full-precision images, and the
attention work skipped (element mask, and 16x16 tiles as a block-sparse kernel skips; ASC halves
a shared layer). ``--explain`` prints what bounds the saving on the shipped VAR: the share of attention
entries in parts that may be windowed (shipped scales and VAR-d16's), the widths the search gives at
R0 = 0.95 on the last scale, the CFG halves' difference per layer and scale (and per layer on the
reference model), and for both geometries the share of attention mass each window width holds
against the share of entries it keeps. ``--memory`` calibrates
MDWA + ASC on 16 and 80 images (LiteVAR saves 80 images' maps) and prints the bytes the window and
CFG statistics take, beside the bytes of the maps LiteVAR's search keeps.

    .venv/bin/python bench/mdwa.py --table --ablation --samples 1000
    .venv/bin/python bench/mdwa.py --explain
    .venv/bin/python bench/mdwa.py --pixart --samples 100 --steps 25
    .venv/bin/python bench/mdwa.py --grid --samples 1000 --reference-samples 100
    .venv/bin/python bench/mdwa.py --deployed --samples 1000
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lowbit.evaluation.run import run_eval, write_results
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes.builtin import MDWA_RATIOS

RESULTS = Path(__file__).parent / "results" / "mdwa"
MIXED = Path(__file__).parent / "results" / "sensitivity" / "var-litevar-w4a8" / "mixed.toml"


def saving(recipe: str | Path | Recipe, name: str, ratio: float | None = None, full_parts: int = 1,
           share: bool = False, threshold: float | None = None, geometry: str = "band") -> Recipe:
    """``recipe`` with windows (``geometry``) at R0 = ``ratio`` past ``full_parts`` whole parts and/or CFG sharing."""
    recipe = get_recipe(recipe)
    if ratio is not None:
        recipe = recipe.with_pass("insert_window_observers", geometry=geometry)
        recipe = recipe.with_pass("choose_attention_windows", ratio=ratio, full_parts=full_parts)
    if share:
        recipe = recipe.with_pass("insert_cfg_observers")
        recipe = recipe.with_pass("choose_cfg_sharing", **({} if threshold is None else {"threshold": threshold}))
    return dataclasses.replace(recipe, name=name)


def windowable(patch_nums: tuple[int, ...], full_parts: int) -> float:
    """The share of one image's attention entries (every scale, queries x cached keys) that lie in key
    parts past the first ``full_parts``: what MDWA could skip if every window shrank to nothing."""
    tokens = [p * p for p in patch_nums]
    total = sum(t * sum(tokens[: k + 1]) for k, t in enumerate(tokens))
    whole = sum(t * sum(tokens[: min(full_parts, k + 1)]) for k, t in enumerate(tokens))
    return 1 - whole / total


def explain(calibration_prompts: int) -> None:
    from lowbit import quantize
    from lowbit.evaluation.run import VARCalibration, calibrate_reference
    from lowbit.ir.attention_windows import ATTENTION_WINDOWS
    from lowbit.ir.cfg_sharing import CFG_SHARING
    from lowbit.models.reference import load_reference_model
    from lowbit.models.var import VARStep, load_tokenizer, load_var

    var = load_var()
    for name, patch_nums in (("shipped", var.config.patch_nums), ("VAR-d16", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))):
        print(f"{name} {patch_nums}: windowable share {windowable(patch_nums, 3):.1%} (first 3 parts whole), "
              f"{windowable(patch_nums, 1):.1%} (first part whole)")
    step = VARStep(var)
    calibration = list(VARCalibration(step, var, load_tokenizer(), calibration_prompts, chunk=16))
    qmodel = quantize(step, saving("mdwa-1", "MDWA 0.95 + ASC", 0.95, full_parts=1, share=True), calibration,
                      step_arg="scale")
    windows, sharing = qmodel.artifacts[ATTENTION_WINDOWS], qmodel.artifacts[CFG_SHARING]
    print(f"widths at R0 = 0.95 on the last scale (part lengths {windows.lengths[0, -1].tolist()}), per layer and head:")
    for layer, widths in zip(windows.layers, windows.widths[:, -1]):
        print(f"  {layer}: {widths.tolist()}")
    print("relative L1 difference of the CFG halves' attention outputs, per layer (rows) and scale (columns):")
    for layer, difference in zip(sharing.layers, sharing.difference):
        print(f"  {layer}: " + " ".join(f"{d:.2f}" for d in difference.tolist()))
    reference = load_reference_model()
    calibration = calibrate_reference(reference, prompts=8, steps=5, progress=False)
    sharing = quantize(reference, "asc", calibration, progress=False).artifacts[CFG_SHARING]
    print("reference model, 8 prompts x 5 steps: relative L1 difference of the CFG halves per layer, over its steps:")
    for layer, difference in zip(sharing.layers, sharing.difference):
        print(f"  {layer}: {difference.min():.2f}-{difference.max():.2f}")


def locality(subject: str, calibration_prompts: int) -> None:
    """How much attention mass each window width holds against how many entries it keeps, per geometry,
    summed over every layer, head and windowable part of the last step (VAR: the last scale; reference
    model: self-attention at the first step): the curve that decides which geometry saves more."""
    import torch

    from lowbit.core.quantize import calibrate
    from lowbit.evaluation.run import VARCalibration, calibrate_reference
    from lowbit.ir.attention_window_statistics import image_keys, part_tokens, window_buckets
    from lowbit.models.reference import load_reference_model
    from lowbit.models.var import VARStep, load_tokenizer, load_var

    if subject == "var":
        var = load_var()
        model, step_arg, full = VARStep(var), "scale", 1
        calibration = list(VARCalibration(model, var, load_tokenizer(), calibration_prompts, chunk=16))
    else:
        model, step_arg, full = load_reference_model(), "timestep", 0
        calibration = calibrate_reference(model, prompts=8, steps=5, progress=False)
    for geometry in ("band", "grid"):
        recipe = saving("mdwa-1", "locality", 0.95, full, geometry=geometry)
        stats = calibrate(model, recipe, calibration, step_arg=step_arg, progress=False).context.observations.stats
        mass, entries = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        for target, per_step in stats.items():
            if not target.endswith(":window_mass"):
                continue
            m = per_step[max(per_step) if subject == "var" else min(per_step)]
            table = torch.tensor(m.lengths)
            if not image_keys(tuple(int(n) for n in part_tokens(table)), m.queries):
                continue
            part, bucket = window_buckets(m.queries, int(part_tokens(table).sum()), table)
            for p in range(full, len(m.lengths)):
                counts = torch.bincount(bucket[:, part == p].flatten(), minlength=m.mass.shape[-1]).double()
                depth = max(len(counts), mass.numel())
                mass = torch.nn.functional.pad(mass, (0, depth - mass.numel())) + torch.nn.functional.pad(
                    m.mass[:, p].sum(0) / m.mass[:, p].sum(), (0, depth - m.mass.shape[-1]))
                entries = torch.nn.functional.pad(entries, (0, depth - entries.numel())) + torch.nn.functional.pad(
                    counts / counts.sum(), (0, depth - len(counts)))
        share = lambda t: (t.cumsum(0) / t.sum()).tolist()
        print(f"{subject}, {geometry}: width w -> share of entries kept / share of attention mass held")
        print("  " + "  ".join(f"w={w + 1}: {e:.0%}/{m:.0%}" for w, (e, m) in enumerate(zip(share(entries), share(mass)))
                               if e < 0.999))


def memory() -> None:
    from lowbit.core.quantize import calibrate
    from lowbit.evaluation.run import VARCalibration
    from lowbit.models.var import VARStep, load_tokenizer, load_var

    var = load_var()
    step = VARStep(var)
    recipe = saving("mdwa-1", "MDWA 0.95 + ASC", 0.95, share=True)
    tokens = [p * p for p in var.config.patch_nums]
    map_bytes = 4 * var.config.depth * var.config.heads * sum(t * sum(tokens[: k + 1]) for k, t in enumerate(tokens))
    print("| calibration images | window + CFG statistics (bytes) | the maps LiteVAR keeps (bytes) |\n|---|---|---|")
    for images in (16, 80):
        calibration = VARCalibration(step, var, load_tokenizer(), images, chunk=16)
        stats = calibrate(step, recipe, calibration, step_arg="scale", progress=False).context.observations.stats
        used = sum(s.nbytes() for target, per_step in stats.items() for s in per_step.values()
                   if target.endswith((":window_mass", ":cfg_difference")))
        print(f"| {images} | {used} | {images * 2 * map_bytes} |")  # x 2: the CFG batch's two halves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="Table 1: the windows alone at every R0")
    parser.add_argument("--ablation", action="store_true", help="Table 3: windows with W4A8 and mixed precision")
    parser.add_argument("--pixart", action="store_true", help="ASC and MDWA on the PixArt reference model")
    parser.add_argument("--explain", action="store_true", help="what bounds the saving on the shipped VAR")
    parser.add_argument("--memory", action="store_true", help="calibration memory at 16 and 80 images")
    parser.add_argument("--grid", action="store_true", help="Table 1 and the reference rows with 2-D windows")
    parser.add_argument("--deployed", action="store_true",
                        help="litevar-w4a8-mp (LiteVAR's own mixed precision: ffn.fc2 in fp) beside the same without it")
    parser.add_argument("--reference-samples", type=int, help="images per row on the reference model (default: --samples)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the reference model")
    parser.add_argument("--calibration-prompts", type=int, default=64)
    args = parser.parse_args()
    if args.explain:
        explain(args.calibration_prompts)
        for subject in ("var", "reference"):
            locality(subject, args.calibration_prompts)
    if args.memory:
        memory()
    runs = {}
    if args.table:
        for full in (3, 1):
            runs[f"var-table1-full{full}"] = ("var", [saving("mdwa-1", f"mdwa-{r:g} (first {full} whole)", r, full)
                                                      for r in MDWA_RATIOS])
    if args.ablation:
        runs["var-table3"] = ("var", [saving("mdwa-1", "MDWA 0.95", 0.95), saving("mdwa-1", "ASC", share=True),
                                      saving("mdwa-1", "ASC where difference <= 0.3", share=True, threshold=0.3),
                                      saving("mdwa-1", "MDWA 0.95 + ASC", 0.95, share=True),
                                      saving("litevar-w4a8", "MDWA 0.95 + ASC + litevar-w4a8", 0.95, share=True),
                                      saving(MIXED, "MDWA 0.95 + ASC + litevar-w4a8 mixed 1.1x", 0.95, share=True)])
    if args.pixart:
        runs["reference"] = ("reference", [saving("mdwa-1", "ASC", share=True),
                                           saving("mdwa-1", "ASC where difference <= 0.3", share=True, threshold=0.3),
                                           saving("mdwa-1", "MDWA 0.95 (band)", 0.95, full_parts=0),
                                           saving("mdwa-1", "MDWA 0.95 + ASC <= 0.3", 0.95, full_parts=0, share=True, threshold=0.3)])
    if args.grid:
        runs["var-table1-grid"] = ("var", [saving("mdwa-1", f"mdwa2d-{r:g} (first 1 whole)", r, 1, geometry="grid")
                                           for r in MDWA_RATIOS])
        runs["reference-grid"] = ("reference", [
            saving("mdwa-1", f"MDWA {r:g} ({geometry})", r, full_parts=0, geometry=geometry)
            for geometry in ("band", "grid") for r in (0.95, 0.8, 0.6)])
    if args.deployed:
        runs["var-deployed"] = ("var", ["litevar-w4a8-mdwa0.95-asc", "litevar-w4a8-mp"])
    for folder, (model, recipes) in runs.items():
        samples = args.reference_samples if model == "reference" and args.reference_samples else args.samples
        rows, grid = run_eval(recipes, samples, steps=args.steps, calibration_prompts=args.calibration_prompts,
                              model_name=model)
        out = RESULTS / folder
        out.mkdir(parents=True, exist_ok=True)
        write_results(rows, grid, out)
        print((out / "eval.md").read_text())


if __name__ == "__main__":
    main()
