"""VAR's multi-scale residual VQ tokenizer (VQVAE with ``VectorQuantizer2``), small.

An image is encoded to a latent f (Cvae channels, n x n). Scale by scale, the residual still
unexplained is area-downsampled to p x p, each position takes its nearest codebook entry, the
entries are upsampled back to n x n, refined by a shared convolution (``phi``, VAR's
quant_resi = 0.5), added to the reconstruction f_hat and subtracted from the residual. The
transformer predicts those indices scale by scale; ``next_input`` gives it, after each scale,
the reconstruction so far downsampled to the next scale (VAR's get_next_autoregressive_input).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenizerConfig", "MultiScaleVQ"]


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 16
    channels: int = 1
    hidden: int = 64
    latent_channels: int = 16
    vocab_size: int = 128
    patch_nums: tuple[int, ...] = (1, 2, 3, 4)
    beta: float = 0.25  # commitment weight

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.image_size != 4 * self.patch_nums[-1]:
            raise ValueError(f"the encoder downsamples by 4: image_size {self.image_size} must be 4 x patch_nums[-1]")

    def to_dict(self) -> dict:
        return {**asdict(self), "patch_nums": list(self.patch_nums)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Phi(nn.Module):
    """VAR's quant_resi: h -> (1 - r) h + r conv(h), with r = 0.5."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MultiScaleVQ(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        c, h, z = config.channels, config.hidden, config.latent_channels
        self.encoder = nn.Sequential(_block(c, h // 2), nn.Conv2d(h // 2, h // 2, 4, 2, 1), _block(h // 2, h),
                                     nn.Conv2d(h, h, 4, 2, 1), _block(h, h), nn.Conv2d(h, z, 1))
        self.decoder = nn.Sequential(nn.Conv2d(z, h, 3, padding=1), _block(h, h), nn.Upsample(scale_factor=2, mode="nearest"),
                                     _block(h, h // 2), nn.Upsample(scale_factor=2, mode="nearest"), _block(h // 2, h // 2),
                                     nn.Conv2d(h // 2, c, 3, padding=1))
        self.embedding = nn.Embedding(config.vocab_size, z)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.vocab_size, 1.0 / config.vocab_size)
        self.phi = Phi(z)

    @property
    def latent_size(self) -> int:
        return self.config.patch_nums[-1]

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index of every position of z (B, Cvae, p, p) -> (B, p*p)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.weight.T + self.embedding.weight.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], -1)

    def _upsampled(self, idx: torch.Tensor, p: int) -> torch.Tensor:
        """Codebook vectors of one scale's indices, at the latent size, refined by phi."""
        h = self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], -1, p, p)
        n = self.latent_size
        return self.phi(F.interpolate(h, size=(n, n), mode="bicubic") if p != n else h)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Indices of every scale, the reconstruction f_hat (straight-through) and the VQ loss."""
        rest, f_hat, indices, loss = f.detach(), torch.zeros_like(f), [], f.new_zeros(())
        for p in self.config.patch_nums:
            z = F.interpolate(rest, size=(p, p), mode="area") if p != self.latent_size else rest
            idx = self._nearest(z)
            h = self._upsampled(idx, p)
            f_hat = f_hat + h
            rest = rest - h.detach()
            indices.append(idx)
            loss = loss + F.mse_loss(f_hat, f.detach()) + self.config.beta * F.mse_loss(f, f_hat.detach())
        return indices, f + (f_hat - f).detach(), loss / len(self.config.patch_nums)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> per scale, indices (B, p*p)."""
        return self.quantize(self.encoder(images))[0]

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_hat).clamp(-1.0, 1.0)

    def decode_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        f_hat = sum(self._upsampled(idx, p) for idx, p in zip(indices, self.config.patch_nums))
        return self.decode(f_hat)

    def next_input(self, scale: int, f_hat: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``scale``'s indices to f_hat; return it and the next scale's input (B, tokens, Cvae)
        (None after the last scale)."""
        f_hat = f_hat + self._upsampled(idx, self.config.patch_nums[scale])
        if scale + 1 == len(self.config.patch_nums):
            return f_hat, None
        p = self.config.patch_nums[scale + 1]
        nxt = F.interpolate(f_hat, size=(p, p), mode="area") if p != self.latent_size else f_hat
        return f_hat, nxt.flatten(2).transpose(1, 2)

    def teacher_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs for every scale after the first (B, tokens - 1, Cvae), as
        sampling would produce them from these indices (VAR's idxBl_to_var_input)."""
        f_hat = torch.zeros(indices[0].shape[0], self.config.latent_channels, self.latent_size, self.latent_size)
        out = []
        for scale, idx in enumerate(indices[:-1]):
            f_hat, nxt = self.next_input(scale, f_hat, idx)
            out.append(nxt)
        return torch.cat(out, dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and VQ loss (training)."""
        _, f_hat, loss = self.quantize(self.encoder(images))
        return self.decoder(f_hat), loss
