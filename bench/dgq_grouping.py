"""Where DGQ's group ranges clip: per-operand clipping on calibration, seen and held-out prompts.

Group quantization (DGQ eq. 6-7) fits one range per group and timestep to the calibration
prompts. This bench measures, for every quantized activation of the reference model, the part
of its values that falls outside its quantization grid (by more than half a step, so rounding
is not counted) as a relative L2 norm, ||x - clamp(x)|| / ||x||:

- on the calibration inputs themselves, where it must be about 0 for every recipe: the ranges
  were fitted to these inputs, and only the error that quantized earlier layers pass on can push
  a value out (labels or timestep rows applied to the wrong vectors would clip here; at 16 bits
  tests/passes/test_group_activations.py checks that this cannot happen);
- on new seeds with the seen phrasings, and on the held-out phrasings.

Recipes: the per-tensor baseline, K = 8 groups with eq. 5 free to group along text-token
positions (``group_text_tokens``, the behaviour before the fix), and K = 8 as shipped (text
operands grouped along channels). Writes ``bench/results/dgq_grouping.md``.

`.venv/bin/python bench/dgq_grouping.py [--calibration-prompts 16] [--prompts 4]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.core.calibration import record_inputs
from lowbit.evaluation.run import calibrate_reference
from lowbit.evaluation.harness import prompt_set
from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.capture import normalize_inputs
from lowbit.ir.schema import FakeQuant, QuantizedAttention, QuantizedConv2d, QuantizedLinear, schema_class
from lowbit.models import text_encoder
from lowbit.models.reference import load_reference_model, sample
from lowbit.core.quantize import quantize
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe

RESULTS = Path(__file__).parent / "results" / "dgq_grouping.md"


class _ClipProbe(torch.fx.Interpreter):
    """Accumulates, per quantized activation, the squared norm of its values and of their clipped part."""

    def __init__(self, qmodel: QuantizedModel):
        super().__init__(qmodel.graph_module)
        self.clipped: dict[str, float] = {}
        self.total: dict[str, float] = {}
        self.axis: dict[str, str] = {}

    def _operand(self, n: torch.fx.Node) -> tuple[str, QuantSpec, tuple] | None:
        schema = schema_class(n)
        if schema not in (FakeQuant, QuantizedLinear, QuantizedConv2d):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        op = schema.from_call(*args, **kwargs)
        path = n.meta[LAYER_KEY].path
        if isinstance(op, FakeQuant):  # attention q / k / v
            user = QuantizedAttention.of(next(iter(n.users)))
            operand = {user.q: "query", user.k: "key", user.v: "value"}[n]
            spec = getattr(next(iter(n.users)).meta[QUANT_KEY], operand)
            return f"{path}:{operand}", spec, (op.x, op.scale, op.zero_point, op.qmin, op.qmax)
        if op.input_scale is None:  # a layer whose input stays in full precision
            return None
        return path, n.meta[QUANT_KEY].input, (op.x, op.input_scale, op.input_zero_point, op.input_qmin, op.input_qmax)

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        found = self._operand(n) if n.op == "call_function" else None
        if found is None:
            return out
        name, spec, (x, s, z, qmin, qmax) = found
        x = x.float()
        lo, hi = (qmin - z - 0.5) * s, (qmax - z + 0.5) * s
        clipped = (x - hi).clamp_min(0) + (lo - x).clamp_min(0)
        self.clipped[name] = self.clipped.get(name, 0.0) + float(clipped.pow(2).sum())
        self.total[name] = self.total.get(name, 0.0) + float(x.pow(2).sum())
        self.axis[name] = "tensor" if spec.granularity != "group" else ("channel" if spec.axis == -1 else "token")
        return out


def clipping(qmodel: QuantizedModel, samples: list) -> tuple[dict[str, float], dict[str, str]]:
    """Relative L2 norm of the clipped part per quantized activation, and its grouping axis."""
    probe = _ClipProbe(qmodel)
    gm = qmodel.graph_module
    with torch.no_grad():
        for args, kwargs in samples:
            inputs = normalize_inputs(qmodel.original, args, kwargs, qmodel.step_arg)
            probe.run(*gm.graph._codegen.process_inputs((), inputs))
    return {k: (probe.clipped[k] / probe.total[k]) ** 0.5 if probe.total[k] else 0.0 for k in probe.total}, probe.axis


def record(model: torch.nn.Module, prompts: int, which: str, seed: int, steps: int) -> list:
    """The denoiser's inputs while the FP sampler draws ``prompts`` images of one phrasing set."""
    texts, _, seeds = prompt_set(prompts, which, seed)
    emb, mask = text_encoder.encode(texts)
    return record_inputs(model, lambda: sample(model, emb, seeds, steps, prompt_mask=mask), progress=False)


def recipes() -> list[Recipe]:
    return [
        Recipe.build("minmax-w8a8", 8, 8),
        Recipe.build("groups-k8, text tokens grouped", 8, 8).with_pass("detect_outlier_dim")
        .with_pass("group_activations", groups=8, group_text_tokens=True),
        Recipe.build("groups-k8", 8, 8).with_pass("detect_outlier_dim").with_pass("group_activations", groups=8),
    ]


def _kind(name: str) -> str:
    if name.endswith((":key", ":value")) and ".attn2" in name:
        return "cross-attention K/V"
    if name.startswith("caption_projection") or name.endswith(("attn2.to_k", "attn2.to_v")):
        return "text-side linear inputs"
    return "image-side activations"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per test set (seen, held-out)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=7, help="seed of the test prompts and noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = load_reference_model()
    calib = calibrate_reference(model, args.calibration_prompts, args.steps, progress=False)
    sets = {"calibration": calib,
            "seen, new seeds": record(model, args.prompts, "seen", args.seed, args.steps),
            "held-out phrasings": record(model, args.prompts, "heldout", args.seed, args.steps)}
    results = {}
    for recipe in recipes():
        qmodel = quantize(model, recipe, calib, progress=False)
        per_set = {name: clipping(qmodel, samples) for name, samples in sets.items()}
        results[recipe.name] = ({name: c for name, (c, _) in per_set.items()}, per_set["calibration"][1])

    lines = [f"Clipped part of each activation, ||x - clamp(x)|| / ||x|| (%), reference model, W8A8, "
             f"{args.calibration_prompts} calibration prompts, {args.prompts} test prompts per set, "
             f"{args.steps} steps. Mean over the operands of each kind; axis = grouping axis.", ""]
    header = "| recipe | operands | axis | " + " | ".join(sets) + " |"
    lines += [header, "|" + "---|" * (3 + len(sets))]
    for recipe, (clip, axis) in results.items():
        names = list(next(iter(clip.values())))
        for kind in ("cross-attention K/V", "text-side linear inputs", "image-side activations"):
            members = [n for n in names if _kind(n) == kind]
            axes = "/".join(sorted({axis[n] for n in members}))
            cells = [f"{100 * sum(clip[s][n] for n in members) / len(members):.2f}" for s in sets]
            lines.append(f"| {recipe} | {kind} ({len(members)}) | {axes} | " + " | ".join(cells) + " |")
    worst = results["groups-k8, text tokens grouped"][0]["held-out phrasings"]
    lines += ["", "Operands that clip most on held-out phrasings with text tokens grouped (%):", "",
              "| operand | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for name in sorted(worst, key=worst.get, reverse=True)[:12]:
        lines.append(f"| `{name}` | " + " | ".join(f"{100 * r[0]['held-out phrasings'][name]:.2f}" for r in results.values()) + " |")
    lines += ["", f"({time.perf_counter() - start:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
