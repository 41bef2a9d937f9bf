"""``lowbit.quantize``: capture, prepare, calibrate, convert — the whole post-training flow."""

from __future__ import annotations

import itertools
import os
from typing import Iterable, Iterator, Sized

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.ir.capture import SIGNATURE_KEY, capture, normalize_inputs
from lowbit.ir.observers import observing
from lowbit.passes import PassContext, Pipeline
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe, get_recipe

__all__ = ["quantize"]


def _samples(calibration: Iterable) -> Iterator[tuple[tuple, dict]]:
    """The calibration samples one at a time, checked, so that a streaming source is never held whole."""
    empty = True
    for i, sample in enumerate(calibration):
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
            raise ValueError(f"calibration sample {i} must be an (args, kwargs) pair for model.forward; got {type(sample).__name__}")
        empty = False
        yield tuple(sample[0]), dict(sample[1])
    if empty:
        raise ValueError("calibration is empty: pass at least one (args, kwargs) pair (see lowbit.record_denoiser_inputs)")


def quantize(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *,
             step_arg: str | None = "timestep", progress: bool = True) -> QuantizedModel:
    """A quantized copy of ``model``; the original module is left untouched.

    ``calibration`` is an iterable of ``(args, kwargs)`` for ``model.forward`` — for a diffusion
    denoiser, the inputs over N prompts × T steps, e.g. :class:`lowbit.DenoiserInputStream`.
    It is read once, one sample at a time, so a stream or generator keeps memory constant.
    ``step_arg`` names the forward argument that carries the step (a diffusion denoiser's timestep,
    a VAR step's scale), by which activation ranges are kept. ``recipe`` is
    a built-in name, the path of a TOML recipe file, or a :class:`Recipe`.
    """
    recipe = get_recipe(recipe)
    samples = _samples(calibration)
    first = next(samples)
    gm = capture(model, *first, step_arg=step_arg)
    ctx = PassContext(precision=recipe.precision, step_arg=step_arg)
    prepare = Pipeline(recipe.phase_passes("rewrite", "observe"))
    decide = Pipeline(recipe.phase_passes("decide", "convert"))
    kept_samples = max((p.kept_samples for p in decide.passes), default=0)
    gm = prepare.run(gm, ctx)
    signature = gm.meta[SIGNATURE_KEY]
    keep = np.random.default_rng(0)  # a uniform, reproducible reservoir of samples for the decide passes
    with torch.no_grad(), observing(gm, ctx.observations):
        calibrating = tqdm(itertools.chain([first], samples), desc=f"calibrating {recipe.name}", disable=not progress, leave=False,
                           total=len(calibration) if isinstance(calibration, Sized) else None)
        for i, (args, kwargs) in enumerate(calibrating):
            inputs = normalize_inputs(model, args, kwargs, step_arg)
            signature.check(inputs, f"calibration sample {i}")
            gm(**inputs)
            if i < kept_samples:
                ctx.samples.append(inputs)
            elif kept_samples and (slot := keep.integers(i + 1)) < kept_samples:
                ctx.samples[slot] = inputs
    gm = decide.run(gm, ctx)
    return QuantizedModel(gm, model, recipe, ctx.params, ctx.artifacts, step_arg, prepare.records + decide.records)
