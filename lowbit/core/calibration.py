"""Record a denoiser's inputs while a diffusers pipeline runs, to feed ``lowbit.quantize``.

The calibration set of DGQ and Q-Diffusion is the denoiser's inputs over N prompts × T steps
of the real sampler, so every timestep's activations are seen. A forward pre-hook captures
them without replacing the pipeline's module. Call the pipeline with ``prompt_embeds`` (and
``negative_prompt_embeds``) so that nothing needs a tokenizer or text-encoder download.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from lowbit.core.distributed import rank

__all__ = ["DenoiserInputStream", "record_denoiser_inputs", "record_inputs"]


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _denoiser(pipe) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a 'transformer' nor a 'unet' module to record")


def record_inputs(module: torch.nn.Module, run: Callable[[], object], *, total: int | None = None,
                  progress: bool = True) -> list[tuple[tuple, dict]]:
    """Every ``(args, kwargs)`` that ``module`` is called with while ``run()`` executes."""
    recorded: list[tuple[tuple, dict]] = []
    bar = tqdm(total=total, desc="recording calibration inputs", disable=not progress or rank() != 0, leave=False)

    def hook(_, args, kwargs):
        recorded.append((_detached(args), _detached(kwargs)))
        bar.update(1)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
        bar.close()
    return recorded


class DenoiserInputStream:
    """The denoiser's inputs over ``calls``, recorded one pipeline call at a time.

    ``lowbit.quantize`` reads calibration once and keeps only statistics, so with this source its
    memory holds one call's inputs (T steps), never N prompts' — calibration memory does not grow
    with the number of prompts. Iterating again runs the pipeline again; the inputs repeat when
    the calls fix their noise (``latents``, or generators that are not shared across iterations).
    """

    def __init__(self, pipe, calls: Iterable[dict], *, progress: bool = True):
        self.pipe, self.calls, self.progress = pipe, list(calls), progress
        self.denoiser = _denoiser(pipe)

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for call in tqdm(self.calls, desc="calibration prompts", disable=not self.progress or len(self.calls) < 2 or rank() != 0,
                         leave=False):
            yield from record_inputs(self.denoiser, lambda call=call: self.pipe(**call),
                                     total=int(call.get("num_inference_steps", 50)), progress=self.progress)


def record_denoiser_inputs(pipe, calls: Iterable[dict], *, progress: bool = True) -> list[tuple[tuple, dict]]:
    """Run ``pipe(**call)`` for each call and return every denoiser input as ``(args, kwargs)``,
    all kept in memory (``DenoiserInputStream`` streams them instead).

    Each ``call`` is a dict of pipeline arguments, e.g. ``{"prompt_embeds": e, "num_inference_steps": 25}``.
    """
    return list(DenoiserInputStream(pipe, calls, progress=progress))
