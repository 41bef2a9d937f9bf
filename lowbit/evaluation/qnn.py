"""Sampling through the phone's graphs: does conditioning survive the trip to the HTP?

A shipped model is quantized and exported as one QNN HTP graph per step — each timestep of the
reference model's 25-step DPM-Solver schedule, or each scale of VAR (its KV cache as graph inputs
and outputs) — and the HTP sessions (``HTPDenoiser``) run a whole sampling run that the
evaluation harness scores beside lowbit's eager quantized model, on the same prompts and seeds.
Besides the harness's metrics it measures how strongly each denoiser follows the text:
the mean norm of the classifier-free-guidance difference eps(text) - eps(empty prompt) over every
call of the run. Users report QNN W8A16 UNets whose conditioning is 20x weaker than in PyTorch;
here the ratio HTP / eager is the check.

The margins are measured, not chosen: alignment may differ by two standard errors of the
difference of two fractions of n images; FID by two standard deviations of the eager model's own
FID over noise seeds (the eager model sampled again with ``reseeds`` further seeds, one row each),
since a difference smaller than what reseeding gives cannot be told from noise. One reseed is a
weak yardstick (at 20 images it put FID's margin below the HTP's move); several make it honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from lowbit.evaluation.run import EVAL_MODELS, compare_images
from lowbit.evaluation.harness import alignment_slack, evaluate
from lowbit.lowering.onnx_qnn import HTPDenoiser, export_schedule
from lowbit.lowering.onnx_qnn.htp import float_weight_bits
from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC
from lowbit.core.quantize import quantize
from lowbit.ir.capture import batch_size

__all__ = ["ConditioningProbe", "QnnEvalRow", "cfg_examples", "margins", "markdown", "run_qnn_eval"]


class ConditioningProbe(torch.nn.Module):
    """Wraps a denoiser called with CFG batches (two halves: [unconditional; conditional], or VAR's
    [class; null]) and records, per call, the mean over images of the norm of the difference of
    the halves' first output (eps, or VAR's logits): the signal classifier-free guidance scales."""

    def __init__(self, denoiser: torch.nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.strengths: list[float] = []

    def forward(self, **kwargs):
        out = self.denoiser(**kwargs)
        eps = out[0] if isinstance(out, (tuple, list)) else out.sample
        uncond, cond = eps.float().chunk(2)
        self.strengths.append(float((cond - uncond).flatten(1).norm(dim=1).mean()))
        return out


@dataclass(frozen=True)
class QnnEvalRow:
    model: str
    fid: float
    inception_score: float
    alignment_seen: float
    alignment_heldout: float
    psnr_vs_eager: float | None  # over the images that differ from eager's
    same_as_eager: float | None  # fraction of images bit-identical to eager's
    conditioning: float
    seconds: float


def cfg_examples(calibration: list, batch: int, step_arg: str = "timestep") -> dict[float, dict]:
    """Per step, the first calibration call's inputs cut (or tiled) to ``batch`` rows, keeping the
    classifier-free-guidance halves of the sampler's batch ([unconditional; conditional] for the
    reference, [class; null] for VAR), in every tensor input (a VAR step's KV cache included)."""
    out = {}
    for _, kw in calibration:
        t = float(torch.as_tensor(kw[step_arg]).reshape(-1)[0])
        if t in out:
            continue
        half = batch_size(kw) // 2
        idx = torch.arange(batch // 2) % half
        cut = lambda v: torch.cat([v[idx], v[half + idx]]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
        out[t] = pytree.tree_map(cut, {k: v for k, v in kw.items() if k != "return_dict"})
    return out


def run_qnn_eval(recipe: str, samples: int, folder: str | Path, *, steps: int = 25, calibration_prompts: int = 16,
                 seed: int = 0, reseeds: int = 3, batch: int = 20, soc: str = DEFAULT_SOC, model_name: str = "reference",
                 progress: bool = False) -> tuple[list[QnnEvalRow], dict[str, torch.Tensor]]:
    """Eager quantized model against its HTP export, ``samples`` images per prompt set, one row each,
    then the eager model with each of ``reseeds`` further seeds: the yardstick of ``margins``.

    The graphs' static batch is ``batch`` (CFG pairs, so even); the HTP denoiser runs a call of
    2 x ``samples`` rows in chunks of it, which keeps the 25 sessions' memory independent of
    ``samples``.
    """
    if reseeds < 1 or batch < 2 or batch % 2:
        raise ValueError(f"eval-qnn needs at least one reseed (got {reseeds}) and an even graph batch >= 2 (got {batch})")
    if model_name not in EVAL_MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(EVAL_MODELS)}")
    subject = EVAL_MODELS[model_name](steps=steps, calibration_prompts=calibration_prompts, progress=progress)
    calibration = list(subject.calibration)
    qmodel = quantize(subject.model, recipe, calibration, step_arg=subject.step_arg, progress=progress)
    examples = cfg_examples(calibration, batch, subject.step_arg)
    export_schedule(qmodel, examples, folder, calibration=calibration, fp_weight_bits=float_weight_bits(soc), progress=progress)
    # the HTP samples one graph batch of prompts at a time, so its progress bar moves
    runs = {f"{recipe} (eager)": (ConditioningProbe(qmodel), seed, samples),
            f"{recipe} (QNN HTP)": (ConditioningProbe(HTPDenoiser(folder, subject.step_arg, soc=soc)), seed, batch // 2)}
    runs.update({f"{recipe} (eager, seed {s})": (ConditioningProbe(qmodel), s, samples)
                 for s in range(seed + 1, seed + 1 + reseeds)})
    rows, images = [], {}
    for name, (probe, run_seed, prompts_per_call) in runs.items():
        start = time.perf_counter()
        result = evaluate(subject.sampler(probe), samples, seed=run_seed, batch_size=prompts_per_call)
        images[name] = result.images_seen
        reference = next(iter(images.values()))
        compared = len(rows) > 0 and run_seed == seed
        psnr_vs_eager, same = compare_images(result.images_seen, reference) if compared else (None, None)
        rows.append(QnnEvalRow(
            model=name, fid=result.fid, inception_score=result.inception_score, alignment_seen=result.alignment_seen,
            alignment_heldout=result.alignment_heldout, psnr_vs_eager=psnr_vs_eager, same_as_eager=same,
            conditioning=float(np.mean(probe.strengths)), seconds=time.perf_counter() - start))
    return rows, images


def margins(rows: list[QnnEvalRow], samples: int) -> list[tuple[str, float, float, float, bool]]:
    """Per metric: (name, eager, HTP, margin, HTP within the margin of eager); see the module docstring."""
    eager, htp, *reseeded = rows
    fid_margin = 2.0 * float(np.std([eager.fid] + [r.fid for r in reseeded], ddof=1))
    out = [("FID", eager.fid, htp.fid, fid_margin, abs(htp.fid - eager.fid) <= fid_margin)]
    for label, field in (("alignment, seen phrasings", "alignment_seen"), ("alignment, held-out phrasings", "alignment_heldout")):
        a, b = getattr(eager, field), getattr(htp, field)
        margin = alignment_slack(a, b, samples)
        out.append((label, a, b, margin, abs(b - a) <= margin))
    return out


def markdown(rows: list[QnnEvalRow], samples: int) -> str:
    """The rows, then the eager-vs-HTP comparison with its margins."""
    lines = ["| denoiser | FID | IS | align seen | align held-out | PSNR vs eager (dB) | same image as eager | CFG signal | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        psnr_cell = "–" if r.psnr_vs_eager is None else f"{r.psnr_vs_eager:.2f}"
        same_cell = "–" if r.same_as_eager is None else f"{r.same_as_eager:.3f}"
        lines.append(f"| {r.model} | {r.fid:.1f} | {r.inception_score:.3f} | {r.alignment_seen:.3f} | {r.alignment_heldout:.3f} "
                     f"| {psnr_cell} | {same_cell} | {r.conditioning:.3f} | {r.seconds:.0f} |")
    lines += ["", "| metric | eager | QNN HTP | margin | within? |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {m:.3f} | {'yes' if ok else 'no'} |" for name, a, b, m, ok in margins(rows, samples)]
    lines.append(f"\nCFG signal HTP / eager: {rows[1].conditioning / rows[0].conditioning:.3f}")
    return "\n".join(lines)
