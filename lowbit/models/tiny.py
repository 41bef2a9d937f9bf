"""Small-config instances of the real diffusers denoisers, with matching example inputs.

Tests, the command line's default job and the benchmarks build the five families the project
supports from these configs (random weights: nothing downloads). The configs keep every code
path of the full models (cross-attention, AdaLN, joint attention, RoPE, linear attention, the
SDXL ``text_time`` embedding) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

__all__ = ["TINY_MODELS", "TinyModel", "build"]

TEXT_TOKENS = 7


@dataclass(frozen=True)
class TinyModel:
    """A family's builder and a function giving example denoiser inputs for a batch size."""

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.Generator], dict]


def _unet(sdxl: bool) -> torch.nn.Module:
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra,
    )


def _unet_inputs(sdxl: bool):
    def inputs(batch: int, g: torch.Generator) -> dict:
        kw = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=g))
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(batch, 1)}
        return kw
    return inputs


def _transformer_inputs(batch: int, g: torch.Generator, pooled: bool = False) -> dict:
    kw = dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.full((batch,), 500.0),
              encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=g))
    if pooled:
        kw["pooled_projections"] = torch.randn(batch, 12, generator=g)
    return kw


def _flux_inputs(batch: int, g: torch.Generator) -> dict:
    ids = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    return dict(hidden_states=torch.randn(batch, 16, 8, generator=g), timestep=torch.full((batch,), 0.5),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=g),
                pooled_projections=torch.randn(batch, 12, generator=g),
                txt_ids=torch.zeros(TEXT_TOKENS, 3), img_ids=torch.cat([torch.zeros(16, 1), ids], 1))


TINY_MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in [
        TinyModel("sd-unet", lambda: _unet(False), _unet_inputs(False)),
        TinyModel("sdxl-unet", lambda: _unet(True), _unet_inputs(True)),
        TinyModel("pixart", lambda: PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
            patch_size=2, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
            num_embeds_ada_norm=1000, use_additional_conditions=False), _transformer_inputs),
        TinyModel("sana", lambda: SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
            sample_size=8, patch_size=1), _transformer_inputs),
        TinyModel("sd3", lambda: SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=16), lambda b, g: _transformer_inputs(b, g, pooled=True)),
        TinyModel("flux", lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 4, 8)), _flux_inputs),
    ]
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of the named family with seeded random weights, in eval mode."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    torch.manual_seed(seed)
    return TINY_MODELS[name].make().eval()
