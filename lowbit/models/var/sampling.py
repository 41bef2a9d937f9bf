"""Class-conditional VAR sampling: one forward per scale over a KV cache, CFG, top-k / top-p.

The transformer is reached through ``VARStep``, a module whose forward is one scale's step —
the unit that lowbit captures, quantizes and exports, as a diffusion denoiser's call is for a
diffusion model. Its ``scale`` argument is the step index that the IR keys calibration
statistics and per-step parameters by (the diffusion timestep's counterpart). The embeddings
(class, position, level, the tokenizer-to-width ``word_embed``) are applied outside the step in
full precision: they are lookups and a (Cvae x width) projection of a few thousand MACs, and
keeping them out leaves one graph shape for every scale (the first scale embeds differently).

The evaluation protocol is pinned in ``PROTOCOL``: VAR's paper and README disagree on the CFG
scale, so nobody can reproduce its FID from its code (FoundationVision/VAR issues #45, #69, #86).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.models.digits import label_of
from lowbit.models.var.model import VAR, run_blocks
from lowbit.models.var.tokenizer import MultiScaleVQ

__all__ = ["PROTOCOL", "SamplingProtocol", "VARStep", "make_sampler", "sample", "sample_tokens"]


@dataclass(frozen=True)
class SamplingProtocol:
    """VAR's guidance ramps from 0 at the first scale to ``cfg`` at the last: t = cfg * si / (n - 1),
    logits = (1 + t) cond - t uncond. ``top_k`` 0 and ``top_p`` 1 disable either filter."""

    cfg: float = 2.0
    top_k: int = 32
    top_p: float = 0.95


PROTOCOL = SamplingProtocol()


class VARStep(nn.Module):
    """One scale of VAR inference, as a module lowbit can capture.

    forward(hidden (B, tokens of this scale, C), cond (B, C), scale (B,), past_keys, past_values)
    -> (logits, *keys, *values): per block the keys and values of every scale so far
    (B, heads, cached tokens, head dim). The token and cache lengths change from scale to scale:
    ``dynamic_dims`` tells lowbit's capture so (one graph for every scale). It shares the VAR's
    ``blocks``, ``head_nm`` and ``head``, under the same names, so layer paths read as VAR's own
    (``blocks.3.ffn.fc2``); ``config`` is the VAR's, which a saved quantized model is checked against.
    ``step_tokens`` (s_k² per scale) tells lowbit how the cached keys divide into scales (MDWA's parts),
    ``cfg_layout`` that a CFG batch is [class; null] (ASC's conditional half).
    """

    cfg_layout = "conditional_first"

    dynamic_dims = {"hidden": (1,), "past_keys": (2,), "past_values": (2,)}

    def __init__(self, var: VAR):
        super().__init__()
        self.blocks, self.head_nm, self.head = var.blocks, var.head_nm, var.head
        self.config = var.config.to_dict()
        self.step_tokens = tuple(p * p for p in var.config.patch_nums)

    def forward(self, hidden: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor,
                past_keys: tuple[torch.Tensor, ...], past_values: tuple[torch.Tensor, ...]):
        h, cache = run_blocks(self.blocks, hidden, cond, tuple(zip(past_keys, past_values)))
        return (self.head(self.head_nm(h, cond)), *(k for k, _ in cache), *(v for _, v in cache))

    def empty_cache(self, batch: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        attn = self.blocks[0].attn
        empty = torch.zeros(batch, attn.heads, 0, attn.head_dim)
        return (empty,) * len(self.blocks), (empty,) * len(self.blocks)


def sample_tokens(logits: torch.Tensor, generators: list[torch.Generator], top_k: int, top_p: float) -> torch.Tensor:
    """One index per token (B, L) from logits (B, L, V), image b drawing from ``generators[b]``."""
    logits = logits.float()
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, generators)])


@torch.no_grad()
def sample(step: nn.Module, var: VAR, tokenizer: MultiScaleVQ, labels: torch.Tensor, seeds: list[int],
           protocol: SamplingProtocol = PROTOCOL, trace: list | None = None) -> torch.Tensor:
    """Images (B, 1, H, W) in [-1, 1] for class ``labels``, image b depending on ``seeds[b]`` only.

    ``step`` is a ``VARStep`` or anything called like one (a quantized or compiled copy, the QNN
    sessions). With ``trace`` (a list), every step's keyword arguments are appended to it: the
    calibration inputs of a sampling run.
    """
    b, config = len(labels), var.config
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} labels")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    both = torch.cat([labels, torch.full_like(labels, var.null_class)])
    hidden, cond = var.embed(both, None, scale=0)
    past_keys, past_values = VARStep(var).empty_cache(2 * b)
    f_hat = torch.zeros(b, config.latent_channels, tokenizer.latent_size, tokenizer.latent_size)
    n = config.scales
    for si in range(n):
        kwargs = dict(hidden=hidden, cond=cond, scale=torch.full((2 * b,), float(si)), past_keys=past_keys, past_values=past_values)
        if trace is not None:
            trace.append(kwargs)
        out = step(**kwargs)
        logits, past_keys, past_values = out[0], tuple(out[1 : 1 + config.depth]), tuple(out[1 + config.depth :])
        t = protocol.cfg * si / max(n - 1, 1)
        guided = (1 + t) * logits[:b] - t * logits[b:]
        idx = sample_tokens(guided, generators, protocol.top_k, protocol.top_p)
        f_hat, nxt = tokenizer.next_input(si, f_hat, idx)
        if nxt is not None:
            hidden, _ = var.embed(both, torch.cat([nxt, nxt]), scale=si + 1)
    return tokenizer.decode(f_hat)


def make_sampler(step: nn.Module, var: VAR, tokenizer: MultiScaleVQ,
                 protocol: SamplingProtocol = PROTOCOL) -> Callable[[list[str], list[int]], torch.Tensor]:
    """A (prompts, seeds) -> images callable, the evaluation harness's interface: each prompt
    names its digit class (the model is class-conditional, so every phrasing of a class samples alike)."""

    def sampler(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return sample(step, var, tokenizer, torch.tensor([label_of(p) for p in prompts]), seeds, protocol)

    return sampler
