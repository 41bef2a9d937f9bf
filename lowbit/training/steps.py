"""What the project's training runs share: the augmentation, the learning-rate schedule, one
optimizer step with gradient clipping and an EMA copy of the weights."""

from __future__ import annotations

import math
import random

import torch

__all__ = ["learning_rate", "optimizer_step", "shift"]


def shift(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Random integer translations: makes models robust to off-centre digits."""
    dx, dy = (random.randint(-max_shift, max_shift) for _ in range(2))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def learning_rate(base: float, step: int, progress: float, warmup: int = 100) -> float:
    """Linear warm-up, then a cosine over the wall-clock ``progress`` in [0, 1], floored at 2% of ``base``
    (the schedule follows the clock, so a run ends on budget even when the CPU is shared)."""
    return base * max(min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress)), 0.02)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, step: int, *,
                   clip: float | None = None, ema: torch.nn.Module | None = None, ema_decay: float = 0.999) -> None:
    """Backward, clip, step at ``lr``; then move ``ema`` towards the weights (decay warmed up as (1+s)/(10+s))."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if ema is not None:
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
