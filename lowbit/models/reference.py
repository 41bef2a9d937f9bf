"""The reference text-to-image denoiser and its sampler.

A real diffusers `PixArtTransformer2DModel` (self-attention, cross-attention to text tokens,
AdaLN-single timestep modulation) at a size trainable on a 2-core CPU, trained on real digits
and conditioned on a real pretrained text encoder. It is the full-precision model that the
quantization recipes are measured against.

The sampler calls the denoiser exactly like diffusers pipelines do, so any module with the same
call signature (a quantized replacement, a captured graph) plugs in unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from torch import nn

from lowbit.models import text_encoder
from lowbit.models.digits import IMAGE_SIZE

__all__ = [
    "CONFIG",
    "SCHEDULE",
    "SAMPLER",
    "WEIGHTS",
    "DEFAULT_GUIDANCE",
    "build_reference_model",
    "load_reference_model",
    "training_scheduler",
    "sample",
    "make_sampler",
]

WEIGHTS = Path(__file__).parent / "weights" / "reference.safetensors"
DEFAULT_GUIDANCE = 3.0

CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,  # epsilon prediction, no learned sigma
    patch_size=2,  # 8x8 = 64 image tokens
    num_attention_heads=4,
    attention_head_dim=32,  # hidden 128
    num_layers=6,
    cross_attention_dim=128,
    caption_channels=text_encoder.EMBED_DIM,
    norm_num_groups=32,
    use_additional_conditions=False,
    interpolation_scale=1,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
# At t = 999 of the cosine schedule alpha is ~1e-5, so the solver's x0 = (x - sigma eps) / alpha
# amplifies any epsilon error enormously; clipping x0 to the data range [-1, 1] keeps it bounded.
SAMPLER = dict(thresholding=True, sample_max_value=1.0)


def build_reference_model() -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(**CONFIG)
    model.cfg_layout = "unconditional_first"  # ``sample`` batches [empty prompt; prompt], as diffusers pipelines do
    return model


def load_reference_model(path: Path = WEIGHTS) -> PixArtTransformer2DModel:
    """The shipped reference model (EMA weights), eval mode, frozen; no network access."""
    from safetensors.torch import load_file

    model = build_reference_model()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def _initial_noise(seeds: list[int]) -> torch.Tensor:
    """One generator per image, so an image depends on its seed only, not on its batch."""
    shape = (1, CONFIG["in_channels"], IMAGE_SIZE, IMAGE_SIZE)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    denoiser: nn.Module,
    prompt_embeds: torch.Tensor,
    seeds: list[int],
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    prompt_mask: torch.Tensor | None = None,
    null_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images (B, 1, 16, 16) in [-1, 1] from DPM-Solver++ with classifier-free guidance.

    prompt_embeds: (B, L, 384) text-encoder states; prompt_mask: (B, L), all ones if omitted.
    The unconditional branch uses the embedding of the empty prompt "" (or `null_embeds`).
    """
    b, length, _ = prompt_embeds.shape
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} prompts")
    if prompt_mask is None:
        prompt_mask = torch.ones(b, length, dtype=torch.long)
    null_emb, null_mask = null_embeds if null_embeds is not None else text_encoder.encode([""], max_length=length)
    emb = torch.cat([null_emb.expand(b, -1, -1), prompt_embeds])
    mask = torch.cat([null_mask.expand(b, -1), prompt_mask])

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, **SAMPLER)
    scheduler.set_timesteps(steps)
    x = _initial_noise(seeds) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x])
        t_in = torch.as_tensor(t).reshape(1).expand(2 * b)
        eps = denoiser(
            hidden_states=x_in, encoder_hidden_states=emb, timestep=t_in,
            encoder_attention_mask=mask, return_dict=False,
        )[0]
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x.clamp(-1.0, 1.0)


def make_sampler(
    denoiser: nn.Module, steps: int = 25, guidance: float = DEFAULT_GUIDANCE
) -> Callable[[list[str], list[int]], torch.Tensor]:
    """A (prompts, seeds) -> images callable, the interface the evaluation harness takes."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in cache} | ({""} - cache.keys()))
        if missing:
            e, m = text_encoder.encode(missing)
            cache.update({p: (e[i : i + 1], m[i : i + 1]) for i, p in enumerate(missing)})
        return torch.cat([cache[p][0] for p in prompts]), torch.cat([cache[p][1] for p in prompts])

    def sampler(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        emb, mask = embed(prompts)
        return sample(denoiser, emb, seeds, steps, guidance, prompt_mask=mask, null_embeds=cache[""])

    return sampler
