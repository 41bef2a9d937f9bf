"""``lowbit eval``: full precision and each recipe side by side on a shipped model.

The model (the reference denoiser, or VAR's per-scale step) is calibrated on its own sampler's
inputs (DGQ §4.1: 64 prompts × 25 steps, streamed; for VAR 64 images × every scale), quantized
with each recipe, and every model is scored by the same harness on the same prompts and seeds:
digit-FID, IS, alignment on seen and held-out phrasings, PSNR against the full-precision samples,
BOPs (per denoiser call, or per VAR image over its scales) and model size. Results are one table (printed,
and written as CSV and markdown) and one PNG grid, a row per model, the same seeds per column.

Under torchrun the calibration chunks and the image batches are shared out between the processes
(``lowbit.core.distributed``); the batches are those of one process, so the table is too.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lowbit.reports.accounting import Cost, attention_saved, costs
from lowbit.core.calibration import record_inputs
from lowbit.core.distributed import shard
from lowbit.ir.attention_windows import WINDOW_BLOCK
from lowbit.ir.capture import batch_size
from lowbit.evaluation.grid import save_grid
from lowbit.evaluation.harness import Sampler, evaluate, prompt_set
from lowbit.evaluation.metrics import psnr
from lowbit.models import text_encoder
from lowbit.models.reference import load_reference_model, make_sampler, sample
from lowbit.models.stress import load_stressed_reference_model
from lowbit.models.var import VAR, MultiScaleVQ, VARStep, load_tokenizer, load_var
from lowbit.models.var import make_sampler as make_var_sampler
from lowbit.models.var import sample as sample_var
from lowbit.core.quantize import quantize
from lowbit.recipes import Recipe, get_recipe

__all__ = ["DIFFUSION_MODELS", "EVAL_MODELS", "EvalRow", "ReferenceCalibration", "Subject", "VARCalibration", "calibrate_reference",
           "compare_images", "run_eval", "write_results"]

CALIBRATION_SEED = 10_000  # prompt and noise seeds apart from every evaluation seed


@dataclass(frozen=True)
class EvalRow:
    model: str
    weight_bits: float
    activation_bits: float
    fid: float
    inception_score: float
    alignment_seen: float
    alignment_heldout: float
    psnr_vs_fp: float | None  # over the images that differ from FP
    same_as_fp: float | None  # fraction of images bit-identical to FP
    gbops: float  # per image, over the calls of ``cost_unit``
    cost_unit: str  # "call" (one denoiser call) or "image" (every scale of a VAR sampling run)
    size_kb: float
    quant_params_kb: float
    seconds: float
    attention_saved: float = math.nan  # fraction of attention work MDWA's windows and ASC skip (element mask)
    attention_saved_blocks: float = math.nan  # the same with windows counted in WINDOW_BLOCK² tiles, as a kernel skips


class ReferenceCalibration:
    """The denoiser's inputs while the reference sampler draws ``prompts`` images (CFG batched),
    produced ``chunk`` prompts at a time; under torchrun, each process produces every n-th chunk.

    Iterating holds one chunk's sampling run (``steps`` inputs of 2 x chunk images) in memory,
    never all prompts' — with ``lowbit.quantize``'s streaming statistics, calibration memory does
    not grow with the number of prompts. Iterating again replays the same inputs (fixed seeds).
    """

    def __init__(self, model: torch.nn.Module, prompts: int = 64, steps: int = 25, chunk: int = 16, progress: bool = True):
        if prompts < 1 or chunk < 1:
            raise ValueError(f"prompts and chunk must be positive; got {prompts}, {chunk}")
        self.model, self.prompts, self.steps, self.chunk, self.progress = model, prompts, steps, chunk, progress

    def chunks(self) -> list[int]:
        """The first prompt of each chunk this process samples: all of them, or its shard under torchrun."""
        return shard(range(0, self.prompts, self.chunk), f"calibration chunks of {self.chunk} prompts")

    def __len__(self) -> int:
        """Denoiser calls per pass: one per step for each chunk (the progress bars' total)."""
        return len(self.chunks()) * self.steps

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        texts, _, seeds = prompt_set(self.prompts, "seen", CALIBRATION_SEED)
        for i in self.chunks():
            emb, mask = text_encoder.encode(texts[i : i + self.chunk])
            run = lambda: sample(self.model, emb, seeds[i : i + self.chunk], self.steps, prompt_mask=mask)  # noqa: E731
            yield from record_inputs(self.model, run, total=self.steps, progress=self.progress)


def calibrate_reference(model: torch.nn.Module, prompts: int = 64, steps: int = 25, progress: bool = True) -> list:
    """All of the denoiser's calibration inputs at once, one batch of ``prompts`` per step (kept
    in memory so that several recipes reuse them; ``ReferenceCalibration`` streams them)."""
    return list(ReferenceCalibration(model, prompts, steps, chunk=prompts, progress=progress))


class VARCalibration:
    """VAR's step inputs (every scale, CFG batched) while it samples ``prompts`` images of the
    calibration seeds at the pinned protocol, ``chunk`` images at a time; replayable, like
    ``ReferenceCalibration``."""

    def __init__(self, step: VARStep, var: VAR, tokenizer: MultiScaleVQ, prompts: int = 64, chunk: int = 16):
        if prompts < 1 or chunk < 1:
            raise ValueError(f"prompts and chunk must be positive; got {prompts}, {chunk}")
        self.step, self.var, self.tokenizer, self.prompts, self.chunk = step, var, tokenizer, prompts, chunk

    def chunks(self) -> list[int]:
        return shard(range(0, self.prompts, self.chunk), f"calibration chunks of {self.chunk} images")

    def __len__(self) -> int:
        return len(self.chunks()) * self.var.config.scales

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        _, labels, seeds = prompt_set(self.prompts, "seen", CALIBRATION_SEED)
        for i in self.chunks():
            trace: list[dict] = []
            sample_var(self.step, self.var, self.tokenizer, labels[i : i + self.chunk], seeds[i : i + self.chunk], trace=trace)
            yield from (((), kwargs) for kwargs in trace)


@dataclass(frozen=True)
class Subject:
    """What ``lowbit eval`` compares for one model: the module that recipes quantize, how to sample
    with it (or with its quantized copy), its calibration inputs (replayable), the argument that
    carries the step, what the cost column counts (the first ``cost_calls`` calibration calls:
    one denoiser "call", or every scale of a VAR "image"), and sanity rows."""

    model: torch.nn.Module
    sampler: Callable[[torch.nn.Module], Sampler]
    calibration: Iterable[tuple[tuple, dict]]
    step_arg: str
    cost_calls: int
    cost_unit: str
    sanity: dict[str, Sampler] = field(default_factory=dict)


def _reference_subject(loader: Callable[[], torch.nn.Module]) -> Callable[..., Subject]:
    def build(steps: int, calibration_prompts: int, progress: bool) -> Subject:
        model = loader()
        # streamed and replayed for every recipe: memory stays at one chunk's inputs however many
        # prompts calibrate (bench/calibration_memory.py), for a few seconds of sampling per recipe
        return Subject(model, lambda m: make_sampler(m, steps=steps), ReferenceCalibration(model, calibration_prompts, steps, progress=progress),
                       "timestep", 1, "call")
    return build


def _var_subject(steps: int, calibration_prompts: int, progress: bool) -> Subject:
    """The shipped VAR (``steps`` is not used: VAR takes one step per scale); its sanity row is the
    same architecture untrained (seed 0), decoded by the shipped tokenizer."""
    var, tokenizer = load_var(), load_tokenizer()
    step = VARStep(var)
    torch.manual_seed(0)
    untrained = VAR(var.config).eval()
    return Subject(step, lambda m: make_var_sampler(m, var, tokenizer), VARCalibration(step, var, tokenizer, calibration_prompts),
                   "scale", var.config.scales, "image", {"untrained VAR": make_var_sampler(VARStep(untrained), untrained, tokenizer)})


# the shipped reference model and the same function with planted SD-like channel outliers
DIFFUSION_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "reference": load_reference_model, "reference-stressed": load_stressed_reference_model}
EVAL_MODELS: dict[str, Callable[..., Subject]] = {name: _reference_subject(load) for name, load in DIFFUSION_MODELS.items()}
EVAL_MODELS["var"] = _var_subject


def compare_images(images: torch.Tensor, reference: torch.Tensor) -> tuple[float | None, float]:
    """(mean PSNR over the images that differ from their FP counterpart, fraction identical).

    An autoregressive model's image is a function of discrete tokens: when quantization leaves
    every token of an image as it was, the image is bit-identical and its PSNR infinite, which would
    make any mean infinite. Those images are counted instead; None when no image differs."""
    values = [psnr(a, b) for a, b in zip(images, reference)]
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else None), 1.0 - len(finite) / len(values)


def _run_cost(model: torch.nn.Module, run: list[tuple[tuple, dict]], step_arg: str) -> tuple[float, Cost]:
    """(BOPs per image summed over the calls ``run``, the cost of its first call)."""
    per_call = costs(model, run, step_arg=step_arg)
    return sum(c.bops / batch_size(kwargs) for c, (_, kwargs) in zip(per_call, run)), per_call[0]


def run_eval(recipes: list[str | Recipe], samples: int, *, seed: int = 0, steps: int = 25, calibration_prompts: int = 64,
             extra_samplers: dict[str, Sampler] | None = None, progress: bool = True,
             model_name: str = "reference") -> tuple[list[EvalRow], dict[str, torch.Tensor]]:
    """Rows of the table (full precision first) and the first image of each class per model.

    ``extra_samplers`` adds rows for any (prompts, seeds) -> images callable (an untrained model,
    another architecture): scored the same way, with no bit-widths or costs, after the model's own
    sanity rows. ``model_name`` names one of ``EVAL_MODELS``.
    """
    if model_name not in EVAL_MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(EVAL_MODELS)}")
    subject = EVAL_MODELS[model_name](steps=steps, calibration_prompts=calibration_prompts, progress=progress)
    model, calibration = subject.model, subject.calibration
    recipes = [get_recipe(r) for r in recipes]
    costed = list(itertools.islice(iter(calibration), subject.cost_calls))

    def entries() -> Iterator[tuple[str, float, float, Sampler, torch.nn.Module | None]]:
        """One model at a time: each quantized model is freed once it is scored."""
        yield "full precision", 32, 32, subject.sampler(model), model
        for recipe in recipes:
            qmodel = quantize(model, recipe, calibration, step_arg=subject.step_arg, progress=progress)
            bits = (32, 32) if recipe.precision.resolve("").keep_float else (recipe.precision.weight_bits, recipe.precision.activation_bits)
            yield recipe.name, *bits, subject.sampler(qmodel), qmodel  # all-float: LiteVAR's attention savings alone
        sanity = subject.sanity | (extra_samplers or {})
        yield from ((name, math.nan, math.nan, sampler, None) for name, sampler in sanity.items())

    rows, grid, fp_images = [], {}, None
    for name, w_bits, a_bits, sampler, denoiser in entries():
        start = time.perf_counter()
        result = evaluate(sampler, samples, seed=seed)
        seconds = time.perf_counter() - start
        if fp_images is None:
            fp_images = result.images_seen
        psnr_vs_fp, same = (None, None) if denoiser is model else compare_images(result.images_seen, fp_images)
        bops, c = _run_cost(denoiser, costed, subject.step_arg) if denoiser is not None else (math.nan, None)
        artifacts = getattr(denoiser, "artifacts", {})
        saved, saved_blocks = attention_saved(artifacts), attention_saved(artifacts, WINDOW_BLOCK)
        rows.append(EvalRow(
            model=name, weight_bits=w_bits, activation_bits=a_bits,
            fid=result.fid, inception_score=result.inception_score,
            alignment_seen=result.alignment_seen, alignment_heldout=result.alignment_heldout,
            psnr_vs_fp=psnr_vs_fp, same_as_fp=same,
            gbops=bops / 1e9, cost_unit=subject.cost_unit,
            size_kb=c.size_bytes / 1024 if c else math.nan,
            quant_params_kb=c.quant_param_bytes / 1024 if c else math.nan,
            seconds=seconds,
            attention_saved=math.nan if saved is None else saved,
            attention_saved_blocks=math.nan if saved_blocks is None else saved_blocks,
        ))
        grid[name] = result.images_seen[:10]
    return rows, grid


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _saved(row: EvalRow) -> str:
    if math.isnan(row.attention_saved):
        return "–"
    return f"{row.attention_saved:.1%} / {row.attention_saved_blocks:.1%}"


def markdown(rows: list[EvalRow]) -> str:
    header = ["model", "W/A", "FID ↓", "IS ↑", "align seen ↑", "align held-out ↑", "PSNR vs FP (dB) ↑", "same image as FP",
              f"GBOPs/{rows[0].cost_unit if rows else 'call'}", "size (KB)", "of which q-params (KB)",
              f"attention FLOPs saved (elements / {WINDOW_BLOCK}² blocks)", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        bits = "–" if math.isnan(r.weight_bits) else f"{r.weight_bits:g}/{r.activation_bits:g}"
        cells = [r.model, bits, _cell(r.fid), _cell(r.inception_score),
                 _cell(r.alignment_seen), _cell(r.alignment_heldout), _cell(r.psnr_vs_fp), _cell(r.same_as_fp), _cell(r.gbops),
                 _cell(r.size_kb), _cell(r.quant_params_kb), _saved(r), f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[EvalRow], grid: dict[str, torch.Tensor], out: Path) -> None:
    """``eval.csv``, ``eval.md`` and ``samples.png`` in ``out`` (a folder that the caller publishes)."""
    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(EvalRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out / "eval.md").write_text(markdown(rows) + "\n")
    save_grid(grid, out / "samples.png", column_titles=[f"digit {i}" for i in range(10)])
