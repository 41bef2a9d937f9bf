"""``lowbit figures``: DGQ's Figures 4 and 5 for one layer of the reference model, as PNGs.

- **Activation heatmap** (DGQ Figure 4b): |x| of one linear layer's input for one image at one
  sampling step, tokens (pixels) down and channels across, with each channel's and each token's
  maximum beside it. A channel-wise outlier is a bright column, a pixel-wise one a bright row.
- **Attention histogram** (DGQ Figure 5a): a cross-attention's probabilities over the whole
  sampling run, on a log scale, the start-token column apart from the other (unmasked) text
  tokens, next to the same block's self-attention. In SD-1.4 the start token makes a peak near 1.

The model runs its own sampler (full precision) with forward hooks; nothing is quantized here.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.evaluation.harness import prompt_set  # noqa: E402
from lowbit.models import text_encoder  # noqa: E402
from lowbit.models.reference import sample  # noqa: E402
from lowbit.evaluation.representativeness import attention_probs_of  # noqa: E402

__all__ = ["Recording", "make_figures", "record", "save_activation_heatmap", "save_attention_histogram"]

_MASKED = -1.0  # attention-mask biases below this mark padding tokens (diffusers uses -10000)


class Recording:
    """What the hooks saw: one activation matrix and the attention probabilities of the conditional half."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None  # (tokens, channels)
        self.start: list[torch.Tensor] = []  # cross-attention probabilities on the start token
        self.rest: list[torch.Tensor] = []  # ... on the other unmasked text tokens
        self.self_attention: list[torch.Tensor] = []


def _attention_hook(recording: Recording, cross: bool):
    def hook(module: nn.Module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        context = kwargs.get("encoder_hidden_states") if cross else None
        bias = kwargs.get("attention_mask")
        cond = slice(hidden.shape[0] // 2, None)  # the sampler batches [unconditional; conditional]
        context = hidden[cond] if context is None else context[cond]
        probs = attention_probs_of(module, hidden[cond], context, None if bias is None else bias[cond])
        if not cross:
            recording.self_attention.append(probs.flatten())
            return
        valid = bias[cond].reshape(probs.shape[0], 1, 1, -1) > _MASKED
        recording.start.append(probs[..., 0].flatten())
        keep = valid.expand_as(probs).clone()
        keep[..., 0] = False
        recording.rest.append(probs[keep])
    return hook


@torch.no_grad()
def record(model: nn.Module, layer: str, attention: str, prompts: int = 4, steps: int = 25, step: int | None = None,
           seed: int = 0) -> Recording:
    """Run the sampler on ``prompts`` seen phrasings; keep ``layer``'s input for the first image at
    ``step`` (default: the middle step) and ``attention``'s probabilities (and those of its
    block's self-attention, ``attn1`` beside ``attn2``) at every step."""
    modules = dict(model.named_modules())
    for path in (layer, attention):
        if path not in modules:
            raise ValueError(f"the model has no module {path!r}; layers look like transformer_blocks.2.attn1.to_q")
    if not isinstance(modules[layer], nn.Linear):
        raise ValueError(f"{layer!r} is a {type(modules[layer]).__name__}; the heatmap pictures a linear layer's input")
    self_attention = attention.rsplit(".", 1)[0] + ".attn1"
    recording, calls = Recording(), [0]
    step = steps // 2 if step is None else step

    def activation_hook(_, args):
        if calls[0] == step:
            x = args[0]
            recording.activation = x[x.shape[0] // 2].reshape(-1, x.shape[-1]).float()  # first conditional image
        calls[0] += 1

    hooks = [modules[layer].register_forward_pre_hook(activation_hook),
             modules[attention].register_forward_pre_hook(_attention_hook(recording, cross=True), with_kwargs=True)]
    if self_attention in modules:
        hooks.append(modules[self_attention].register_forward_pre_hook(_attention_hook(recording, cross=False), with_kwargs=True))
    try:
        texts, _, seeds = prompt_set(prompts, "seen", seed)
        emb, mask = text_encoder.encode(texts)
        sample(model, emb, seeds, steps, prompt_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    if recording.activation is None:
        raise ValueError(f"step {step} was never reached in {steps} sampling steps")
    return recording


def save_activation_heatmap(x: torch.Tensor, title: str, path: Path) -> Path:
    """|x| (tokens x channels) with the per-channel and per-token maxima as marginal plots."""
    a = x.abs().numpy()
    fig = plt.figure(figsize=(9, 5.5))
    grid = fig.add_gridspec(2, 2, width_ratios=(6, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    heat = fig.add_subplot(grid[1, 0])
    image = heat.imshow(a, aspect="auto", cmap="magma", interpolation="nearest")
    heat.set_xlabel("channel")
    heat.set_ylabel("token (pixel)")
    top = fig.add_subplot(grid[0, 0], sharex=heat)
    top.bar(np.arange(a.shape[1]), a.max(0), width=1.0, color="tab:red")
    top.set_ylabel("max |x|\nper channel", fontsize=8)
    top.tick_params(labelbottom=False)
    side = fig.add_subplot(grid[1, 1], sharey=heat)
    side.barh(np.arange(a.shape[0]), a.max(1), height=1.0, color="tab:blue")
    side.set_xlabel("max |x|\nper token", fontsize=8)
    side.tick_params(labelleft=False)
    fig.colorbar(image, ax=[heat, side], fraction=0.03, pad=0.02, label="|x|")
    widths = a.max(0)
    top.set_title(f"{title}\nwidest channel {widths.argmax()} at {widths.max() / np.median(widths):.1f}x the median "
                  f"channel max; widest token {a.max(1).argmax()} at {a.max(1).max() / np.median(a.max(1)):.1f}x", fontsize=9)
    return _save(fig, path)


def save_attention_histogram(recording: Recording, title: str, path: Path) -> Path:
    """Histograms of log10 probabilities: start token, other text tokens, self-attention."""
    bins = np.linspace(-8, 0, 81)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    series = [("start token", recording.start, "tab:red"), ("other text tokens", recording.rest, "tab:blue")]
    for ax, group in zip(axes, (series, [("self-attention", recording.self_attention, "tab:gray")])):
        for label, values, color in group:
            if not values:
                continue
            v = torch.cat(values).clamp_min(1e-8).log10().numpy()
            ax.hist(v, bins=bins, weights=np.full(len(v), 1.0 / len(v)), alpha=0.6, color=color,
                    label=f"{label} (mean {10 ** v.mean():.2g}, median {10 ** np.median(v):.2g})")
        ax.set_yscale("log")
        ax.set_xlabel("log10 attention probability")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of entries")
    axes[0].set_title(f"{title}: cross-attention", fontsize=9)
    axes[1].set_title("same block: self-attention", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def make_figures(model: nn.Module, layer: str, out: Path, attention: str | None = None, label: str = "reference",
                 **record_kwargs) -> list[Path]:
    """``activation_<layer>.png`` and ``attention_<attention>.png`` in ``out``. ``attention``
    defaults to the cross-attention (attn2) of ``layer``'s transformer block."""
    if attention is None:
        parts = layer.split(".")
        block = ".".join(parts[:2]) if parts[0] == "transformer_blocks" and len(parts) > 1 else "transformer_blocks.0"
        attention = f"{block}.attn2"
    rec = record(model, layer, attention, **record_kwargs)
    step = record_kwargs.get("step")
    return [
        save_activation_heatmap(rec.activation, f"{label}: input of {layer}, step {step if step is not None else 'middle'}",
                                out / f"activation_{layer}.png"),
        save_attention_histogram(rec, f"{label}: {attention}", out / f"attention_{attention}.png"),
    ]
