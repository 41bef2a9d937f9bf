"""Does the reference model show the activation statistics that DGQ targets?

A quantization recipe is only tested by a model that has the difficulties it was designed for.
This measures, on the trained reference model over 64 prompts x 25 sampling steps (with CFG):
- for every linear layer's input: max|x| / p99.9(|x|) (outlier strength), and the spreads of the
  per-channel and per-token ranges, D = (max a_max - min a_max) + (max a_min - min a_min)
  (DGQ eq. 4-5: the larger one says whether outliers are channel-wise or pixel/token-wise);
- for every cross-attention layer: the mean softmax(QK^T / sqrt(d)) probability on the start
  ([CLS]) token column for the text prompts (CFG's conditional half), next to the value a uniform
  attention would give, 1 / (number of unmasked text tokens).

`python -m lowbit.evaluation.representativeness` prints both as markdown tables.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.ir.statistics import RangeStatistics, spread
from lowbit.models import digits, text_encoder
from lowbit.models.reference import load_reference_model, sample

__all__ = ["LinearStats", "attention_probs_of", "measure", "markdown", "main"]

SUBSAMPLE_PER_CALL = 20_000


@dataclass
class LinearStats:
    max_abs: float = 0.0
    samples: list[torch.Tensor] = field(default_factory=list)  # |x| subsample for the p99.9
    ranges: RangeStatistics | None = None  # per-channel and per-token min/max, as calibration keeps them

    def update(self, x: torch.Tensor, gen: torch.Generator) -> None:
        flat = x.detach().float().abs().flatten()
        self.max_abs = max(self.max_abs, flat.max().item())
        self.samples.append(flat[torch.randint(0, flat.numel(), (SUBSAMPLE_PER_CALL,), generator=gen)])
        seen = RangeStatistics.of(x, "channels_last")
        self.ranges = seen if self.ranges is None else self.ranges.merge(seen)

    def row(self) -> dict[str, float | None]:
        p999 = torch.quantile(torch.cat(self.samples), 0.999).item()
        r = self.ranges
        widths = r.channel_max - r.channel_min
        return {
            "channels": len(widths),
            "max_over_p999": self.max_abs / max(p999, 1e-12),
            "D_channel": spread(r.channel_min, r.channel_max),
            "D_token": None if r.token_min.numel() == 1 else spread(r.token_min, r.token_max),
            "top_channel_range_over_median": (widths.max() / widths.median().clamp_min(1e-12)).item(),
            "top_channels": widths.topk(min(2, len(widths))).indices.tolist(),
        }


def attention_probs_of(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor, bias) -> torch.Tensor:
    """softmax(QK^T * scale + mask bias), (B, heads, queries, keys), recomputed from to_q / to_k.

    F.linear on their weights, not the modules, so the linear-input hooks do not count twice.
    """
    b, heads = hidden.shape[0], attn.heads
    q = F.linear(hidden, attn.to_q.weight, attn.to_q.bias).view(b, -1, heads, attn.inner_dim // heads).transpose(1, 2)
    k = F.linear(context, attn.to_k.weight, attn.to_k.bias).view(b, -1, heads, attn.inner_dim // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * attn.scale
    if bias is not None:
        scores = scores + bias.view(b, 1, -1, scores.shape[-1])
    return scores.softmax(-1)


@torch.no_grad()
def measure(n_prompts: int = 64, steps: int = 25, seed: int = 0) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-linear-input statistics and per-cross-attention start-token probabilities."""
    torch.manual_seed(seed)
    model = load_reference_model()
    gen = torch.Generator().manual_seed(seed)
    linear_stats: dict[str, LinearStats] = {}
    attn_stats: dict[str, list[tuple[float, float]]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            linear_stats[name] = LinearStats()
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: linear_stats[name].update(args[0], gen)))
        if name.endswith("attn2"):
            attn_stats[name] = []

            def attn_hook(m, args, kwargs, name=name):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                context, bias = kwargs["encoder_hidden_states"], kwargs["attention_mask"]
                cond = slice(hidden.shape[0] // 2, None)  # the sampler batches [uncond; cond]
                probs = attention_probs_of(m, hidden[cond], context[cond], bias[cond])
                n_valid = (bias[cond].flatten(1) > -1.0).sum(-1).float()
                attn_stats[name].append((probs[..., 0].mean().item(), (1.0 / n_valid).mean().item()))

            hooks.append(mod.register_forward_pre_hook(attn_hook, with_kwargs=True))

    prompts = [digits.prompts_for(i % 10, "seen")[(i // 10) % len(digits.SEEN_TEMPLATES)] for i in range(n_prompts)]
    emb, mask = text_encoder.encode(prompts)
    sample(model, emb, list(range(seed, seed + n_prompts)), steps=steps, prompt_mask=mask)
    for h in hooks:
        h.remove()
    linear = {name: s.row() for name, s in linear_stats.items()}
    attention = {
        name: {"start_token_prob": sum(v[0] for v in vals) / len(vals), "uniform": sum(v[1] for v in vals) / len(vals)}
        for name, vals in attn_stats.items()
    }
    return linear, attention


def markdown(linear: dict[str, dict], attention: dict[str, dict]) -> str:
    def f(v):
        return "—" if v is None else f"{v:.2f}"

    lines = [
        "| linear input | C | max/p99.9 | D_channel | D_token | outlier dim | top ch range / median | top channels |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for name, r in linear.items():
        dim = "channel" if r["D_token"] is None or r["D_channel"] >= r["D_token"] else "token"
        lines.append(
            f"| `{name}` | {r['channels']} | {f(r['max_over_p999'])} | {f(r['D_channel'])} | {f(r['D_token'])} "
            f"| {dim} | {f(r['top_channel_range_over_median'])} | {r['top_channels']} |"
        )
    lines += ["", "| cross-attention | mean P(start token) | uniform 1/#tokens |", "| --- | ---: | ---: |"]
    for name, r in attention.items():
        lines.append(f"| `{name}` | {r['start_token_prob']:.3f} | {r['uniform']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Activation statistics of the reference model (DGQ C1/C2).")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(markdown(*measure(args.prompts, args.steps)))


if __name__ == "__main__":
    main()
