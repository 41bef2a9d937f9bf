"""The loss and bit-width curves of quantization-aware training runs, in one picture.

Distillation losses jump between steps because each step is one diffusion timestep (one
sampler step), whose error scale differs; the curve shows a running mean over ``window`` steps
next to the raw values, and the weights' bit-width of each run on a second panel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.ir.training_history import TrainingHistory

__all__ = ["plot_training"]


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return np.array([(sums[i + 1] - sums[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))])


def plot_training(runs: dict[str, TrainingHistory], path: str | Path, title: str, window: int = 25) -> None:
    """Loss (log scale, running mean over ``window`` steps) above, bit-width below, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, bits_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for (label, history), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        loss = history.loss.double().numpy()
        steps = np.arange(1, len(loss) + 1)
        loss_ax.plot(steps, loss, color=colour, alpha=0.15, linewidth=0.6)
        loss_ax.plot(steps, _running_mean(loss, window), color=colour, label=label)
        bits_ax.step(steps, history.bits.numpy(), where="post", color=colour, label=label)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel(f"distillation loss (MSE)\nrunning mean of {window} steps")
    loss_ax.legend(fontsize=8)
    loss_ax.set_title(title, fontsize=10)
    bits_ax.set_ylabel("weight bits")
    bits_ax.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
