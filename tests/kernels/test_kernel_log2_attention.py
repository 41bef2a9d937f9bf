"""Log2 attention against its reference and lowbit's quantized_attention (probs_scheme "log2").

Tolerances. float32: the kernel and the references differ only in float32 summation order and
exp/log2 implementations (relative ~1e-7), so outputs of magnitude ~1 agree to atol 1e-5 -
unless one of those ~1e-7 differences moves a probability across a log2 rounding boundary,
which would change that p_dq by a factor of 2. ``_assert_no_borderline`` checks that the test
data keeps every probability at least 5e-5 (in log2 units, ~50x those differences) from a boundary, so a mismatch is the
kernel's fault, on the interpreter and on CUDA's approximate exp alike. bfloat16: one bf16 ulp
(2^-8 relative) on p_dq and on the output, as both cast to V's dtype.
"""

import pytest
import torch

from lowbit.ir.schema import QuantizedAttention
from lowbit.kernels.log2_attention import log2_attention, log2_attention_reference

quantized_attention = QuantizedAttention.overload()

B, H, NQ, NKV, D = 2, 2, 37, 45, 24  # cross-attention, ragged against the blocks, D not a power of two


def _qkv(device, seed=0, nq=NQ, nkv=NKV):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(device) for n in (nq, nkv, nkv)]


def _assert_no_borderline(q, k, scale, levels, start_token, probs_scale):
    probs = torch.softmax(q.float() @ k.float().transpose(-2, -1) * scale, dim=-1)
    others = torch.ones(probs.shape[-1], dtype=torch.bool, device=probs.device)
    if start_token >= 0:
        others[start_token] = False
    s = probs[..., others].amax() if probs_scale is None else probs_scale
    y = -torch.log2(probs[..., others] / s)
    y = y[(y > -0.5) & (y < levels - 1.5)]  # values that clamp cannot flip
    assert ((y - torch.floor(y) - 0.5).abs() > 5e-5).all(), "test data too close to a rounding boundary"


@pytest.mark.parametrize("start_token, probs_scale, levels, seed", [
    (0, None, 16, 1),       # DGQ: start column in full precision, dynamic scale, 4 bits
    (-1, 0.25, 256, 6),     # no start column, static scale, 8 bits
    (7, None, 256, 4),      # a start column inside a key block
])
def test_float32_matches_references(device, start_token, probs_scale, levels, seed):
    q, k, v = _qkv(device, seed)
    scale = D ** -0.5
    ps = torch.tensor(probs_scale, device=device) if probs_scale is not None else None
    _assert_no_borderline(q, k, scale, levels, start_token, ps)
    y = log2_attention(q, k, v, scale, levels, start_token, ps)
    assert y.shape == (B, H, NQ, D) and y.dtype == torch.float32
    torch.testing.assert_close(y, log2_attention_reference(q, k, v, scale, levels, start_token, ps), rtol=0, atol=1e-5)
    ref = quantized_attention(q, k, v, None, scale, ps, None, "log2", 0, levels - 1, start_token, ps is None)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_strided_inputs_and_bfloat16(device):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(device, torch.bfloat16).transpose(1, 2) for n in (33, 33, 33))
    y = log2_attention(q, k, v, D ** -0.5, 16, 0)
    ref = quantized_attention(q, k, v, None, D ** -0.5, None, None, "log2", 0, 15, 0, True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7)


def test_start_column_keeps_full_precision_and_tiny_probabilities_are_not_zeroed(device):
    q, k, v = _qkv(device, seed=3, nq=5, nkv=20)
    q = q.abs() + 0.5
    k[..., 9, :] = -40.0  # key 9: score below -150, its probability underflows to exactly 0 for every query
    scale, levels = D ** -0.5, 16
    probs = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    assert (probs[..., 9] == 0).all()
    for column in (0, 9):
        one_hot = torch.zeros_like(v)
        one_hot[..., column, 0] = 1.0  # out[..., 0] is then p_dq[..., column]
        y = log2_attention(q, k, one_hot, scale, levels, start_token=0)[..., 0]
        s = probs[..., 1:].amax()
        if column == 0:  # full precision, not a power-of-two multiple of s
            torch.testing.assert_close(y, probs[..., 0], rtol=1e-5, atol=0)
            assert not torch.allclose(y, s * torch.exp2(-torch.round(-torch.log2(probs[..., 0] / s))))
        else:  # clamped to the last level, s 2^-(levels-1), as lowbit's op
            torch.testing.assert_close(y, (s * 2.0 ** -(levels - 1)).expand_as(y), rtol=1e-5, atol=0)


def test_rejects_bad_arguments(device):
    q, k, v = _qkv(device, nq=4, nkv=4)
    with pytest.raises(ValueError, match="start_token"):
        log2_attention(q, k, v, 1.0, 16, start_token=4)
    with pytest.raises(ValueError, match="one value"):
        log2_attention(q, k, v, 1.0, 16, probs_scale=torch.ones(2, device=device))
