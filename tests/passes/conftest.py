"""A hand-written tiny denoiser: one conv, SDPA self-attention, explicit cross-attention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.ir.capture import capture


class TinyDenoiser(nn.Module):
    heads, dim = 2, 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.cq, self.ck, self.cv = nn.Linear(8, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.out = nn.Linear(8, 4)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, sample, timestep, text):
        b = sample.shape[0]
        h = self.conv(sample).flatten(2).transpose(1, 2)  # (B, 16, 8)
        h = h + self.time(timestep.reshape(-1, 1) / 1000)[:, None]
        q, k, v = (self._heads(f(h)) for f in (self.to_q, self.to_k, self.to_v))
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, 8)
        # the classic diffusers AttnProcessor: baddbmm, softmax, bmm over (B*heads, N, d)
        q, k, v = (self._heads(f(x)).reshape(b * self.heads, -1, 4) for f, x in ((self.cq, h), (self.ck, text), (self.cv, text)))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1])
        probs = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=0.5).softmax(dim=-1)
        h = h + torch.bmm(probs, v).reshape(b, self.heads, -1, 4).transpose(1, 2).reshape(b, -1, 8)
        return self.out(h)


def tiny_inputs(batch=2, t=500.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 4, 4, generator=g), timestep=torch.full((batch,), t),
                text=torch.randn(batch, 5, 6, generator=g))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    return model, capture(model, (), tiny_inputs())
