"""VAR, the visual autoregressive transformer of FoundationVision (next-scale prediction).

Module names follow FoundationVision's VAR so that recipes and reports read the same as on the
released checkpoints: ``word_embed``, ``class_emb`` (the last index is the null class of
classifier-free guidance), ``lvl_embed``, ``pos_1LC``, ``pos_start``; per block ``attn.mat_qkv``
(no bias, plus ``q_bias``/``v_bias``), ``attn.proj``, ``ffn.fc1``, ``ffn.fc2`` (tanh-GELU) and
``ada_lin`` (SiLU + Linear to 6C); ``head_nm.ada_lin`` and ``head``. Queries and keys are
L2-normalised with a learned per-head scale, as in VAR's ``attn_l2_norm``.

Two ways to run it, which give the same logits (tests/models/test_var.py):

- ``forward(labels, x_wo_first)`` — training: all scales at once under the block-causal mask
  (a token sees every token of its own and earlier scales);
- ``step(h, cond, past)`` — inference: one scale's tokens, attending to the keys and values of
  earlier scales kept in a cache, so the prefix is never recomputed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VAR", "VARConfig", "KVCache", "run_blocks"]

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per block: keys, values (B, H, tokens so far, head dim)


@dataclass(frozen=True)
class VARConfig:
    """Any VAR shape: VAR-d16 is depth 16, width 1024, 16 heads, patch_nums 1..16 (10 scales),
    a 4096-entry codebook of 32 channels and 1000 classes."""

    depth: int = 6
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_nums: tuple[int, ...] = (1, 2, 3, 4)
    vocab_size: int = 128
    latent_channels: int = 16
    num_classes: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if min(self.depth, self.heads, self.vocab_size, self.latent_channels, self.num_classes) < 1:
            raise ValueError(f"every size must be positive: {self}")
        if not self.patch_nums or self.patch_nums[0] != 1 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must start at 1 and increase strictly; got {self.patch_nums}")

    @property
    def scales(self) -> int:
        return len(self.patch_nums)

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def scale_slices(self) -> list[slice]:
        """Where each scale's tokens sit in the flattened sequence."""
        out, begin = [], 0
        for p in self.patch_nums:
            out.append(slice(begin, begin + p * p))
            begin += p * p
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "patch_nums": list(self.patch_nums)}


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised Q and K and a learned per-head scale."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        k = F.normalize(k, dim=-1)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """A VAR block: adaptive layer norm (two gammas, scales and shifts from the class) around
    attention and the MLP."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ffn = FFN(width, hidden)
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, past=None, mask=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).unbind(2)
        h, kv = self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, past, mask)
        x = x + h * gamma1
        x = x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2
        return x, kv


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


def run_blocks(blocks: nn.ModuleList, h: torch.Tensor, cond: torch.Tensor, past: KVCache | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    """The blocks in order; returns the hidden states and every block's keys and values so far."""
    cache = []
    for i, block in enumerate(blocks):
        h, kv = block(h, cond, None if past is None else past[i], mask)
        cache.append(kv)
    return h, tuple(cache)


class VAR(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        c = config.width
        self.word_embed = nn.Linear(config.latent_channels, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.pos_1LC = nn.Parameter(torch.randn(1, config.tokens, c) * 0.02)
        self.lvl_embed = nn.Embedding(config.scales, c)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=0.02)
        levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(config.patch_nums)])
        self.register_buffer("lvl_1L", levels[None], persistent=False)
        hidden = round(c * config.mlp_ratio)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(c, config.heads, hidden) for _ in range(config.depth))
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Linear(c, config.vocab_size)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def position(self, scale: int) -> torch.Tensor:
        """(1, tokens of ``scale``, C): the position and level embeddings of one scale's tokens."""
        where = self.config.scale_slices()[scale]
        return self.pos_1LC[:, where] + self.lvl_embed(self.lvl_1L[:, where])

    def embed(self, labels: torch.Tensor, x_wo_first: torch.Tensor | None, scale: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, condition) at the input of the blocks.

        ``x_wo_first`` (B, tokens, Cvae) holds the tokenizer's input features of the scales after
        the first (``scale`` None: all of them; otherwise ``scale`` >= 1 alone); the first scale's
        single token is the class embedding plus ``pos_start``.
        """
        cond = self.class_emb(labels)
        first = cond[:, None] + self.pos_start
        if scale == 0:
            return first + self.position(0), cond
        if scale is not None:
            return self.word_embed(x_wo_first) + self.position(scale), cond
        h = torch.cat([first, self.word_embed(x_wo_first)], dim=1)
        return h + self.pos_1LC + self.lvl_embed(self.lvl_1L), cond

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h, cond))

    def block_causal_mask(self) -> torch.Tensor:
        """(L, L) bool, True where a query may attend: keys of the same or an earlier scale."""
        return self.lvl_1L[0][:, None] >= self.lvl_1L[0][None, :]

    def forward(self, labels: torch.Tensor, x_wo_first: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, tokens, vocabulary) of every scale at once."""
        h, cond = self.embed(labels, x_wo_first)
        h, _ = run_blocks(self.blocks, h, cond, mask=self.block_causal_mask())
        return self.logits(h, cond)

    def step(self, h: torch.Tensor, cond: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """One scale: logits of its tokens and the cache extended by them."""
        h, cache = run_blocks(self.blocks, h, cond, past)
        return self.logits(h, cond), cache
