"""``lowbit export --target qnn-htp``, ``lowbit verify-qnn`` and ``lowbit eval-qnn``: the command-line
side of the QNN lowering.

``export`` quantizes a shipped model (the reference digits model, the digits VAR or a small diffusers
config), writes one HTP graph per step of its sampling schedule (timestep, or VAR scale), the
example inputs of each, the quantized model itself (to compare against), a manifest, and the
weight-shared EPContext binary a phone loads. ``verify-qnn`` loads one exported graph on the HTP with CPU fallback disabled,
names any node that would not map, compares it with lowbit's eager module when the export folder
holds one, and writes that graph's EPContext model. ``eval-qnn`` samples the reference model or
VAR with the HTP graphs in the model's place and scores the images beside lowbit's eager module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.cli.arguments import positive_int
from lowbit.core.staging import add_output_arguments, output_folder, staged_folder
from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC, SOCS, float_weight_bits

__all__ = ["add_commands"]

QNN_MODELS = ("reference", "var", "pixart", "sana", "sd3", "sd-unet", "sdxl-unet", "flux")


def _step_arg(name: str) -> str:
    return "scale" if name == "var" else "timestep"


def _fp_model(name: str) -> torch.nn.Module:
    """The module exported: a denoiser, or the shipped VAR's per-scale step."""
    if name == "reference":
        from lowbit.models.reference import load_reference_model

        return load_reference_model()
    if name == "var":
        from lowbit.models.var import VARStep, load_var

        return VARStep(load_var())
    from lowbit.models.tiny import build

    return build(name)


def _calibration(name: str, model: torch.nn.Module, prompts: int, steps: int) -> list:
    """The model's inputs: the reference sampler's own (CFG batches), VAR's at every scale while it
    samples ``prompts`` images, or a small config's example inputs (batch 2 per prompt) at ``steps``
    timesteps spread over the schedule."""
    if name == "reference":
        from lowbit.evaluation.run import calibrate_reference

        return calibrate_reference(model, prompts, steps, progress=False)
    if name == "var":
        from lowbit.evaluation.run import VARCalibration
        from lowbit.models.var import load_tokenizer, load_var

        return list(VARCalibration(model, load_var(), load_tokenizer(), prompts, chunk=prompts))
    from lowbit.models.tiny import TINY_MODELS

    g = torch.Generator().manual_seed(0)
    scale = 1 / 1000 if name == "flux" else 1.0  # FLUX takes timesteps in [0, 1]
    samples = []
    for t in torch.linspace(999, 1, steps).round().tolist():
        for _ in range(prompts):
            kw = TINY_MODELS[name].inputs(2, g)
            kw["timestep"] = torch.full((2,), t * scale)
            samples.append(((), kw))
    return samples


def _cmd_export(args: argparse.Namespace) -> int:
    from lowbit.core.quantize import quantize
    from lowbit.core.serialization import save
    from lowbit.evaluation.qnn import cfg_examples
    from lowbit.ir.capture import normalize_inputs
    from lowbit.lowering.onnx_qnn import compile_context, export_schedule
    from lowbit.lowering.onnx_qnn.specialize import flat_inputs
    from lowbit.recipes import get_recipe

    if args.batch < 2 or args.batch % 2:
        raise ValueError(f"--batch must be an even number (prompt pairs for classifier-free guidance); got {args.batch}")
    out = output_folder(args)
    model = _fp_model(args.model)
    recipe = get_recipe(args.recipe)
    calibration = _calibration(args.model, model, args.prompts, args.steps)
    qmodel = quantize(model, recipe, calibration, step_arg=_step_arg(args.model), progress=False)
    examples = cfg_examples(calibration, args.batch, qmodel.step_arg)
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        results = export_schedule(qmodel, examples, tmp, calibration=calibration, fp_weight_bits=float_weight_bits(args.soc))
        manifest = json.loads((tmp / "manifest.json").read_text())
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "model": args.model, "soc": args.soc}, indent=1))
        (tmp / "inputs").mkdir()
        for r in results:  # every input the eager module takes, also those the graph folded (an empty cache)
            flat = flat_inputs(qmodel.graph_module, normalize_inputs(model, (), examples[r.timestep], qmodel.step_arg))
            save_file({n: v.float().contiguous() for n, v in flat.items() if n != qmodel.step_arg},
                      str(tmp / "inputs" / f"{r.path.stem}.safetensors"))
        save(qmodel, tmp / "quantized")
        contexts = compile_context([r.path for r in results], tmp / "context", soc=args.soc)
    size = sum(p.stat().st_size for p in (out / "context").glob("*.bin"))
    print(f"lowbit: {args.model} quantized with {recipe.name}: {len(results)} HTP graphs (batch {results[0].batch}, "
          f"{qmodel.step_arg}s {', '.join(f'{r.timestep:g}' for r in results)}) in {out}")
    print(f"lowbit: EPContext models {', '.join(p.name for p in contexts)} share one context binary of {size / 1e6:.2f} MB "
          f"in {out / 'context'}")
    if float_weight_bits(args.soc) < 16:
        print(f"lowbit: {args.soc}'s HTP (v{SOCS[args.soc][0]}) takes no 16-bit weights: the layers the recipe keeps in full "
              f"precision went in with {float_weight_bits(args.soc)}-bit weights")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lowbit.core.serialization import load
    from lowbit.lowering.onnx_qnn import verify_qnn

    path = Path(args.model)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    folder = path.parent
    inputs = reference = None
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    if manifest.get("model") not in (None, *QNN_MODELS):
        raise ValueError(f"{folder / 'manifest.json'} names the model {manifest['model']!r}, which this lowbit does not "
                         f"ship (it knows {', '.join(QNN_MODELS)}); was the folder written by another version?")
    if "model" in manifest and (folder / "inputs" / f"{path.stem}.safetensors").is_file():
        inputs = load_file(str(folder / "inputs" / f"{path.stem}.safetensors"))
        reference = load(folder / "quantized", _fp_model(manifest["model"]))
    soc = args.soc or manifest.get("soc", DEFAULT_SOC)  # the SoC it was exported for, unless told otherwise
    report = verify_qnn(path, inputs, reference, context_dir=args.context_dir or folder / "verify", soc=soc)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _cmd_eval_qnn(args: argparse.Namespace) -> int:
    from lowbit.evaluation.grid import save_grid
    from lowbit.evaluation.qnn import margins, markdown, run_qnn_eval

    out = output_folder(args)
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        rows, images = run_qnn_eval(args.recipe, args.samples, tmp / "graphs", steps=args.steps,
                                    calibration_prompts=args.calibration_prompts, reseeds=args.reseeds,
                                    batch=args.batch, soc=args.soc, model_name=args.model, progress=True)
        table = markdown(rows, args.samples)
        (tmp / "eval_qnn.md").write_text(table + "\n")
        first = {name: images[name][:10] * 2 - 1 for name in list(images)[:2]}  # same prompts and seeds, one row each
        save_grid(first, tmp / "samples.png")
    print(table)
    print(f"lowbit: wrote {out}/eval_qnn.md, {out}/samples.png and the HTP graphs in {out}/graphs")
    return 0 if all(ok for *_, ok in margins(rows, args.samples)) else 1


def add_commands(sub) -> None:
    """Register ``export``, ``verify-qnn`` and ``eval-qnn`` on the ``lowbit`` command's subparsers."""
    x = sub.add_parser("export", help="quantize a shipped model and export it for a target (qnn-htp: ONNX for the phone's HTP)")
    x.add_argument("--target", default="qnn-htp", choices=("qnn-htp",), help="lowering target")
    x.add_argument("--model", default="reference", choices=QNN_MODELS, help="the model to quantize and export")
    x.add_argument("--recipe", default="minmax-w8a8", help="a built-in recipe name or a .toml file")
    x.add_argument("--prompts", type=positive_int, default=8, help="calibration prompts (reference) or samples per timestep")
    x.add_argument("--steps", type=positive_int, default=25, help="sampling steps: one HTP graph per step (VAR: one per scale)")
    x.add_argument("--batch", type=positive_int, default=2, help="the graphs' static batch: 2 x prompts per call (CFG pairs)")
    x.add_argument("--soc", default=DEFAULT_SOC, choices=list(SOCS), help="the phone's Snapdragon SoC (default: 8 Elite)")
    add_output_arguments(x, "out/qnn")
    x.set_defaults(func=_cmd_export)
    v = sub.add_parser("verify-qnn", help="load an exported model on the QNN HTP with no CPU fallback, compare, write its EPContext")
    v.add_argument("model", help="an exported .onnx graph (lowbit export --target qnn-htp)")
    v.add_argument("--soc", default=None, choices=list(SOCS), help="the phone's SoC (default: the one it was exported for, else sm8750)")
    v.add_argument("--context-dir", default=None, help="where to write the EPContext model (default: <folder>/verify)")
    v.set_defaults(func=_cmd_verify)
    e = sub.add_parser("eval-qnn", help="sample a shipped model with its HTP graphs; score it beside eager")
    e.add_argument("--model", default="reference", choices=("reference", "var"), help="the reference denoiser or the shipped VAR")
    e.add_argument("--recipe", default="minmax-w8a8", help="a built-in recipe name")
    e.add_argument("--samples", type=positive_int, default=100, help="images per prompt set")
    e.add_argument("--batch", type=positive_int, default=20, help="the graphs' static batch (CFG pairs); calls run in chunks of it")
    e.add_argument("--soc", default=DEFAULT_SOC, choices=list(SOCS), help="the phone's Snapdragon SoC (default: 8 Elite)")
    e.add_argument("--reseeds", type=int, default=3, help="further noise seeds of the eager model: FID's margin is 2 SD over seeds")
    e.add_argument("--steps", type=positive_int, default=25, help="sampling steps: one HTP graph per step (VAR: one per scale)")
    e.add_argument("--calibration-prompts", type=positive_int, default=16, help="calibration prompts")
    add_output_arguments(e, "out/eval-qnn")
    e.set_defaults(func=_cmd_eval_qnn)
