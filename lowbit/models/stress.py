"""The stress variant of the reference model: SD-like channel outliers, planted without changing its function.

The reference model's activations have mild outliers (a channel's range is at most ~6x the
median channel range), where Stable Diffusion shows channels of 20x and more (DGQ Figure 4).
Methods built for those outliers need a model that has them, and the same trained model must
stay the reference. So a few channels of the normalized, modulated input of every block's
self-attention (norm1 → attn1.to_q/k/v) and feed-forward (norm2 → ff.net.0.proj) are multiplied
by a factor f and the matching input columns of those linears divided by f: the block computes
the same function (up to fp32 rounding) while its quantized activations carry f-times channels.

PixArt's LayerNorms have no affine weights; their affine part is the AdaLN-single modulation
n = LN(h)·(1 + scale) + shift, with shift and scale the sum of the block's ``scale_shift_table``
row and the timestep embedding from the shared ``adaln_single.linear``. Multiplying n's channel
c by f means f·shift and 1 + scale' = f·(1 + scale): both rows of the shared linear's output
times f, and in every block shift_table·f, scale_table' = f·scale_table + f − 1. As the linear
is shared, every block gets the same channels and factors.

The channels and factors below were chosen from the range of each channel over 4 prompts × 25
steps (0 and 64 are the widest attention-input channels at 3.4-3.5x the median in every block;
2 and 32 the widest feed-forward ones at 2.2x): planted, they measure 27x-70x the median channel
range across the blocks, and ``tests/models/test_stress.py`` checks >= 20x in every block.
"""

from __future__ import annotations

import copy

import torch
from diffusers import PixArtTransformer2DModel

from lowbit.models.reference import load_reference_model

__all__ = ["ATTENTION_OUTLIERS", "FEED_FORWARD_OUTLIERS", "load_stressed_reference_model", "plant_channel_outliers"]

ATTENTION_OUTLIERS = {0: 8.0, 64: 12.0}  # channel -> factor, on norm1's output (attn1.to_q/k/v input)
FEED_FORWARD_OUTLIERS = {2: 12.0, 32: 16.0}  # on norm2's output (ff.net.0.proj input)
# rows of the AdaLN-single modulation: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
_SHIFT_MSA, _SCALE_MSA, _SHIFT_MLP, _SCALE_MLP = 0, 1, 3, 4


@torch.no_grad()
def plant_channel_outliers(model: PixArtTransformer2DModel, attention: dict[int, float] = ATTENTION_OUTLIERS,
                           feed_forward: dict[int, float] = FEED_FORWARD_OUTLIERS) -> PixArtTransformer2DModel:
    """A copy of ``model`` whose modulated norm outputs carry channel c times f, the next linears
    dividing it back out; ``model`` itself is left untouched."""
    out = copy.deepcopy(model)
    dim = out.transformer_blocks[0].scale_shift_table.shape[1]
    modulation = out.adaln_single.linear
    sites = (
        (_SHIFT_MSA, _SCALE_MSA, attention, lambda b: (b.attn1.to_q, b.attn1.to_k, b.attn1.to_v)),
        (_SHIFT_MLP, _SCALE_MLP, feed_forward, lambda b: (b.ff.net[0].proj,)),
    )
    for shift, scale, planted, consumers in sites:
        for c, f in planted.items():
            for row in (shift * dim + c, scale * dim + c):
                modulation.weight[row] *= f
                modulation.bias[row] *= f
            for block in out.transformer_blocks:
                table = block.scale_shift_table
                table[shift, c] *= f
                table[scale, c] = f * table[scale, c] + (f - 1.0)
                for linear in consumers(block):
                    linear.weight[:, c] /= f
    return out


def load_stressed_reference_model() -> PixArtTransformer2DModel:
    """The shipped reference model with the channel outliers above planted; eval mode, frozen."""
    return plant_channel_outliers(load_reference_model())
