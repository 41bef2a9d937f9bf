"""``lowbit eval``: full precision and each recipe side by side on the shipped reference model.

The reference denoiser is calibrated on its own sampler's inputs (DGQ §4.1: 64 prompts × 25
steps, streamed), quantized with each recipe, and every model is scored by the same harness on
the same prompts and seeds: digit-FID, IS, alignment on seen and held-out phrasings, PSNR against the
full-precision samples, BOPs per denoiser call and model size. Results are one table (printed,
and written as CSV and markdown) and one PNG grid, a row per model, the same seeds per column.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lowbit.reports.accounting import cost
from lowbit.core.calibration import record_inputs
from lowbit.evaluation.grid import save_grid
from lowbit.evaluation.harness import Sampler, evaluate, prompt_set
from lowbit.evaluation.metrics import psnr
from lowbit.models import text_encoder
from lowbit.models.reference import load_reference_model, make_sampler, sample
from lowbit.models.stress import load_stressed_reference_model
from lowbit.core.quantize import quantize
from lowbit.recipes import Recipe, get_recipe

__all__ = ["EVAL_MODELS", "EvalRow", "ReferenceCalibration", "calibrate_reference", "run_eval", "write_results"]

CALIBRATION_SEED = 10_000  # prompt and noise seeds apart from every evaluation seed
# the shipped reference model, and the same function with planted SD-like channel outliers
EVAL_MODELS = {"reference": load_reference_model, "reference-stressed": load_stressed_reference_model}


@dataclass(frozen=True)
class EvalRow:
    model: str
    weight_bits: float
    activation_bits: float
    fid: float
    inception_score: float
    alignment_seen: float
    alignment_heldout: float
    psnr_vs_fp: float | None
    gbops: float
    size_kb: float
    quant_params_kb: float
    seconds: float


class ReferenceCalibration:
    """The denoiser's inputs while the reference sampler draws ``prompts`` images (CFG batched),
    produced ``chunk`` prompts at a time.

    Iterating holds one chunk's sampling run (``steps`` inputs of 2 x chunk images) in memory,
    never all prompts' — with ``lowbit.quantize``'s streaming statistics, calibration memory does
    not grow with the number of prompts. Iterating again replays the same inputs (fixed seeds).
    """

    def __init__(self, model: torch.nn.Module, prompts: int = 64, steps: int = 25, chunk: int = 16, progress: bool = True):
        if prompts < 1 or chunk < 1:
            raise ValueError(f"prompts and chunk must be positive; got {prompts}, {chunk}")
        self.model, self.prompts, self.steps, self.chunk, self.progress = model, prompts, steps, chunk, progress

    def __len__(self) -> int:
        """Denoiser calls per pass: one per step for each chunk (the progress bars' total)."""
        return math.ceil(self.prompts / self.chunk) * self.steps

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        texts, _, seeds = prompt_set(self.prompts, "seen", CALIBRATION_SEED)
        for i in range(0, self.prompts, self.chunk):
            emb, mask = text_encoder.encode(texts[i : i + self.chunk])
            run = lambda: sample(self.model, emb, seeds[i : i + self.chunk], self.steps, prompt_mask=mask)  # noqa: E731
            yield from record_inputs(self.model, run, total=self.steps, progress=self.progress)


def calibrate_reference(model: torch.nn.Module, prompts: int = 64, steps: int = 25, progress: bool = True) -> list:
    """All of the denoiser's calibration inputs at once, one batch of ``prompts`` per step (kept
    in memory so that several recipes reuse them; ``ReferenceCalibration`` streams them)."""
    return list(ReferenceCalibration(model, prompts, steps, chunk=prompts, progress=progress))


def _mean_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(np.mean([psnr(a, b) for a, b in zip(images, reference)]))


def run_eval(recipes: list[str | Recipe], samples: int, *, seed: int = 0, steps: int = 25, calibration_prompts: int = 64,
             extra_samplers: dict[str, Sampler] | None = None, progress: bool = True,
             model_name: str = "reference") -> tuple[list[EvalRow], dict[str, torch.Tensor]]:
    """Rows of the table (full precision first) and the first image of each class per model.

    ``extra_samplers`` adds rows for any (prompts, seeds) -> images callable (an untrained model,
    another architecture): scored the same way, with no bit-widths or costs. ``model_name`` names
    one of ``EVAL_MODELS``.
    """
    if model_name not in EVAL_MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(EVAL_MODELS)}")
    model = EVAL_MODELS[model_name]()
    recipes = [get_recipe(r) for r in recipes]
    # streamed and replayed for every recipe: memory stays at one chunk's inputs however many
    # prompts calibrate (bench/calibration_memory.py), for a few seconds of sampling per recipe
    calibration = ReferenceCalibration(model, calibration_prompts, steps, progress=progress)
    example = next(iter(calibration)) if recipes else None

    def entries() -> Iterator[tuple[str, float, float, Sampler, torch.nn.Module | None]]:
        """One model at a time: each quantized model is freed once it is scored."""
        yield "full precision", 32, 32, make_sampler(model, steps=steps), model
        for recipe in recipes:
            qmodel = quantize(model, recipe, calibration, progress=progress)
            yield recipe.name, recipe.precision.weight_bits, recipe.precision.activation_bits, make_sampler(qmodel, steps=steps), qmodel
        yield from ((name, math.nan, math.nan, sampler, None) for name, sampler in (extra_samplers or {}).items())

    rows, grid, fp_images = [], {}, None
    for name, w_bits, a_bits, sampler, denoiser in entries():
        start = time.perf_counter()
        result = evaluate(sampler, samples, seed=seed)
        seconds = time.perf_counter() - start
        if fp_images is None:
            fp_images = result.images_seen
        c = cost(denoiser, *example) if example is not None and denoiser is not None else None
        rows.append(EvalRow(
            model=name, weight_bits=w_bits, activation_bits=a_bits,
            fid=result.fid, inception_score=result.inception_score,
            alignment_seen=result.alignment_seen, alignment_heldout=result.alignment_heldout,
            psnr_vs_fp=None if denoiser is model else _mean_psnr(result.images_seen, fp_images),
            gbops=c.bops / 1e9 / example[1]["hidden_states"].shape[0] if c else math.nan,
            size_kb=c.size_bytes / 1024 if c else math.nan,
            quant_params_kb=c.quant_param_bytes / 1024 if c else math.nan,
            seconds=seconds,
        ))
        grid[name] = result.images_seen[:10]
    return rows, grid


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[EvalRow]) -> str:
    header = ["model", "W/A", "FID ↓", "IS ↑", "align seen ↑", "align held-out ↑", "PSNR vs FP (dB) ↑",
              "GBOPs/call", "size (KB)", "of which q-params (KB)", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        bits = "–" if math.isnan(r.weight_bits) else f"{r.weight_bits:g}/{r.activation_bits:g}"
        cells = [r.model, bits, _cell(r.fid), _cell(r.inception_score),
                 _cell(r.alignment_seen), _cell(r.alignment_heldout), _cell(r.psnr_vs_fp), _cell(r.gbops),
                 _cell(r.size_kb), _cell(r.quant_params_kb), f"{r.seconds:.0f}"]
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
