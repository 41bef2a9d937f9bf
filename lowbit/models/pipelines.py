"""Tiny diffusers pipelines around the small-config denoisers, driven by ``prompt_embeds``.

They let the command line and the tests run the real denoising loops of PixArtAlphaPipeline
and StableDiffusionPipeline with no tokenizer, text encoder or weights to download.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, StableDiffusionPipeline

from lowbit.models.tiny import TEXT_TOKENS, build

__all__ = ["PIPELINE_MODELS", "pipeline_calls", "tiny_pipeline"]

PIPELINE_MODELS = ("pixart", "sd-unet")
_IMAGE = 32  # pixels; the tiny VAE downsamples by 4 to the denoisers' 8x8 latents


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                         latent_channels=4, norm_num_groups=4, sample_size=_IMAGE).eval()


def tiny_pipeline(name: str, denoiser: torch.nn.Module | None = None):
    """A pipeline of the named family with a tiny VAE and a DPM-Solver scheduler."""
    denoiser = denoiser if denoiser is not None else build(name)
    if name == "pixart":
        return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=denoiser,
                                   scheduler=DPMSolverMultistepScheduler())
    if name == "sd-unet":
        return StableDiffusionPipeline(tokenizer=None, text_encoder=None, vae=_vae(), unet=denoiser,
                                       scheduler=DPMSolverMultistepScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    raise KeyError(f"no tiny pipeline for {name!r}; choose one of {', '.join(PIPELINE_MODELS)}")


def pipeline_calls(name: str, prompts: int, steps: int, seed: int = 0) -> list[dict]:
    """Pipeline arguments for ``prompts`` random prompt embeddings (standing in for a text encoder)."""
    g = torch.Generator().manual_seed(seed)
    width = 24 if name == "pixart" else 32
    calls = []
    for i in range(prompts):
        call = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, width, generator=g),
                    negative_prompt_embeds=torch.zeros(1, TEXT_TOKENS, width), num_inference_steps=steps,
                    height=_IMAGE, width=_IMAGE, output_type="pt", guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(seed + i))
        if name == "pixart":
            call.update(prompt_attention_mask=torch.ones(1, TEXT_TOKENS), negative_prompt=None,
                        negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS), use_resolution_binning=False)
        calls.append(call)
    return calls
