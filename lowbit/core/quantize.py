"""``lowbit.quantize``: capture, prepare, calibrate, convert — the whole post-training flow."""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import os
from typing import Iterable, Iterator, Sized

import torch
import torch.fx
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from lowbit.core.calibrated import Calibrated
from lowbit.core.distributed import all_gather, is_distributed, rank, to_device, together, world_size
from lowbit.ir.capture import SIGNATURE_KEY, capture, normalize_inputs
from lowbit.ir.observers import observing
from lowbit.ir.statistics import ObservationStore
from lowbit.passes import PassContext, Pipeline
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe, get_recipe

__all__ = ["calibrate", "quantize"]


def _samples(calibration: Iterable) -> Iterator[tuple[tuple, dict]]:
    """The calibration samples one at a time, checked, so that a streaming source is never held whole."""
    empty = True
    for i, sample in enumerate(calibration):
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
            raise ValueError(f"calibration sample {i} must be an (args, kwargs) pair for model.forward; got {type(sample).__name__}")
        empty = False
        yield tuple(sample[0]), dict(sample[1])
    if empty and is_distributed():
        raise ValueError(f"calibration is empty on rank {rank()} of {world_size()}: under torchrun each process's calibration "
                         f"is its shard of the whole set, and every shard needs at least one (args, kwargs) pair")
    if empty:
        raise ValueError("calibration is empty: pass at least one (args, kwargs) pair (see lowbit.record_denoiser_inputs)")


def _digest(inputs: dict) -> bytes:
    """A hash of a sample's contents (argument names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in pytree.tree_leaves_with_path(inputs):
        h.update(pytree.keystr(path).encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(leaf).encode())
    return h.digest()


class _KeptSamples:
    """The ``k`` calibration samples that the decide passes run the model on again (weight reconstruction):
    those with the smallest content hash. That is a uniform random choice which depends on the samples
    alone, not on their order nor on how they are split between processes, so every rank keeps the same
    ones as a single process would on the whole set."""

    def __init__(self, k: int):
        self.k, self.kept = k, []  # (digest, inputs), sorted

    def offer(self, inputs: dict) -> None:
        if self.k:
            bisect.insort(self.kept, (_digest(inputs), inputs), key=lambda entry: entry[0])
            del self.kept[self.k:]

    def gathered(self) -> list[dict]:
        """Every rank's kept samples pooled, the ``k`` smallest hashes of them, on this rank's device."""
        if not is_distributed():
            return [inputs for _, inputs in self.kept]
        device = next((t.device for t in pytree.tree_leaves(self.kept) if isinstance(t, torch.Tensor)), "cpu")
        pooled = sorted(itertools.chain(*all_gather(to_device(self.kept, "cpu"))), key=lambda entry: entry[0])
        return [to_device(inputs, device) for _, inputs in pooled[: self.k]]


def _merged(observations: ObservationStore) -> ObservationStore:
    """Every rank's statistics merged (min, max and counts: exact, whatever the order)."""
    if not is_distributed():
        return observations
    return functools.reduce(ObservationStore.merge, all_gather(observations.to("cpu"))).to(observations.device())


def calibrate(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *,
              step_arg: str | None = "timestep", keep: int = 0, progress: bool = True) -> Calibrated:
    """``model`` captured, its rewrite and observe passes run, and ``calibration`` read once (the first
    half of :func:`quantize`). ``keep`` samples are kept for analyses that run the model again."""
    recipe = get_recipe(recipe)
    progress = progress and rank() == 0
    ctx = PassContext(precision=recipe.precision, step_arg=step_arg)
    prepare = Pipeline(recipe.phase_passes("rewrite", "observe"))
    needed = max((p.kept_samples for p in recipe.phase_passes("decide")), default=0)
    kept = _KeptSamples(max(needed, keep))

    def run() -> torch.fx.GraphModule:
        samples = _samples(calibration)
        first = next(samples)
        gm = prepare.run(capture(model, *first, step_arg=step_arg), ctx)
        signature = gm.meta[SIGNATURE_KEY]
        with torch.no_grad(), observing(gm, ctx.observations):
            calibrating = tqdm(itertools.chain([first], samples), desc=f"calibrating {recipe.name}", disable=not progress,
                               leave=False, total=len(calibration) if isinstance(calibration, Sized) else None)
            for i, (args, kwargs) in enumerate(calibrating):
                inputs = normalize_inputs(model, args, kwargs, step_arg)
                signature.check(inputs, f"calibration sample {i}")
                gm(**inputs)
                kept.offer(inputs)
        return gm

    gm = together(run)  # a rank whose shard fails stops every rank, rather than leaving them waiting
    ctx.observations = _merged(ctx.observations)
    samples = kept.gathered()  # sorted by hash: the first ``needed`` are the ones a smaller ``keep`` gives
    ctx.samples = samples[:needed]
    return Calibrated(model, recipe, gm, ctx, samples, prepare.records)


def quantize(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *,
             step_arg: str | None = "timestep", progress: bool = True) -> QuantizedModel:
    """A quantized copy of ``model``; the original module is left untouched.

    ``calibration`` is an iterable of ``(args, kwargs)`` for ``model.forward`` — for a diffusion
    denoiser, the inputs over N prompts × T steps, e.g. :class:`lowbit.DenoiserInputStream`.
    It is read once, one sample at a time, so a stream or generator keeps memory constant.
    ``step_arg`` names the forward argument that carries the step (a diffusion denoiser's timestep,
    a VAR step's scale), by which activation ranges are kept. ``recipe`` is
    a built-in name, the path of a TOML recipe file, or a :class:`Recipe`.

    Under ``torchrun`` (an initialised ``torch.distributed``), each process's ``calibration`` is its
    shard of the whole set: the statistics of all shards are merged exactly, and every process returns
    the same model as one process calibrated on the whole set would. Passes that run the model again
    after calibration (``reconstruct_weights``) run on every process over the same kept samples:
    replicated rather than sharded, since sharding them would exchange gradients at every iteration of
    a job that takes seconds per layer.
    """
    return calibrate(model, recipe, calibration, step_arg=step_arg, progress=progress).decide()
