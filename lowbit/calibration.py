"""Record a denoiser's inputs while a diffusers pipeline runs, to feed ``lowbit.quantize``.

The calibration set of DGQ and Q-Diffusion is the denoiser's inputs over N prompts × T steps
of the real sampler, so every timestep's activations are seen. A forward pre-hook captures
them without replacing the pipeline's module. Call the pipeline with ``prompt_embeds`` (and
``negative_prompt_embeds``) so that nothing needs a tokenizer or text-encoder download.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

__all__ = ["record_denoiser_inputs"]


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


def record_denoiser_inputs(pipe, calls: Iterable[dict], *, progress: bool = True) -> list[tuple[tuple, dict]]:
    """Run ``pipe(**call)`` for each call and return every denoiser input as ``(args, kwargs)``.

    Each ``call`` is a dict of pipeline arguments, e.g. ``{"prompt_embeds": e, "num_inference_steps": 25}``.
    """
    calls = list(calls)
    denoiser = _denoiser(pipe)
    recorded: list[tuple[tuple, dict]] = []
    total = sum(int(c.get("num_inference_steps", 50)) for c in calls)
    bar = tqdm(total=total, desc="recording calibration inputs", disable=not progress, leave=False)

    def hook(module, args, kwargs):
        recorded.append((_detached(args), _detached(kwargs)))
        bar.update(1)

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for call in calls:
                pipe(**call)
    finally:
        handle.remove()
        bar.close()
    return recorded
