"""The reference implementations of the domain ops on known values."""

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit.ir.ops  # noqa: F401

lowbit = torch.ops.lowbit


def test_fake_quant_matches_eq1_by_hand():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.9, 3.0])
    out = lowbit.fake_quant(x, torch.tensor(0.25), torch.tensor(4.0), 0, 15)
    # q = clamp(round(x/0.25) + 4, 0, 15) -> [0, 3, 4, 5, 8, 15]; x_dq = 0.25 (q - 4)
    assert out.tolist() == [-1.0, -0.25, 0.0, 0.25, 1.0, 2.75]


def test_log2_quantizer_matches_eq2():
    s = torch.tensor(1.0)
    x = torch.tensor([1.0, 0.5, 0.3, 0.125, 1e-9])
    out = lowbit.log2_fake_quant(x, s, 8)  # 3 bits: exponents 0..7
    # -log2(0.3) = 1.74 -> 2 -> 0.25; 1e-9 clamps to the last level 2^-7
    assert out.tolist() == [1.0, 0.5, 0.25, 0.125, 2.0 ** -7]


def test_dynamic_uniform_probabilities_span_zero_to_the_run_time_max():
    from lowbit.ir.ops import quantize_probs

    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    out = quantize_probs(probs, None, None, "uniform", 0, 3, -1, True)  # 2 bits on [0, 0.5]: step 1/6
    # codes round(p / (1/6)) = [3, 1.5 -> 2, 0.75 -> 1, 1]
    assert torch.allclose(out, torch.tensor([[0.5, 1 / 3, 1 / 6, 1 / 6]]))
    signed = quantize_probs(probs, None, None, "uniform", -2, 1, -1, True)  # the same grid, zero at qmin
    assert torch.allclose(signed, out)


def test_select_timestep_picks_the_nearest_row():
    table = torch.tensor([[1.0], [2.0], [3.0]])
    steps = torch.tensor([999.0, 500.0, 1.0])
    assert lowbit.select_timestep(table, steps, torch.tensor([480.0, 480.0])).item() == 2.0
    assert lowbit.select_timestep(table, steps, torch.tensor(2000.0)).item() == 1.0


def test_quantized_linear_and_conv_equal_dequantized_math():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    w = torch.randint(-8, 8, (6, 8), dtype=torch.int8)
    ws, b = torch.rand(6) + 0.1, torch.randn(6)
    s, z = torch.tensor(0.05), torch.tensor(128.0)
    y = lowbit.quantized_linear(x, w, ws, b, s, z, 0, 255)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    torch.testing.assert_close(y, F.linear(xq, w.float() * ws[:, None], b), rtol=0, atol=1e-6)
    xc = torch.randn(1, 3, 6, 6)
    wc = torch.randint(-100, 100, (4, 3, 3, 3), dtype=torch.int8)
    yc = lowbit.quantized_conv2d(xc, wc, ws[:4], None, None, None, 0, 0, [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(yc, F.conv2d(xc, wc.float() * ws[:4, None, None, None], None, 1, 1), rtol=1e-6, atol=1e-5)


def test_attention_without_quantization_is_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = torch.rand(2, 1, 10, 6) > 0.3
    mask[..., 0] = True
    out = lowbit.quantized_attention(q, k, v, mask, 1 / math.sqrt(8), None, None, "none", 0, 0, -1, False)
    # float32 reassociation only: SDPA's CPU kernel sums in another order
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-6)


def test_start_token_split_keeps_column_zero_exact():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.eye(5).expand(1, 2, 5, 5)
    # with V = I the output rows are the (quantized) probabilities themselves
    out = lowbit.quantized_attention(q, k, v, None, 0.35, None, None, "log2", 0, 15, 0, True)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.35, -1)
    torch.testing.assert_close(out[..., 0], ref[..., 0])
    rest = ref[..., 1:]
    s = rest.amax()
    expected = s * torch.exp2(-torch.clamp(torch.round(-torch.log2(rest / s)), 0, 15))
    torch.testing.assert_close(out[..., 1:], expected)


@pytest.mark.parametrize("op, args", [
    ("fake_quant", lambda: (torch.randn(3, 4), torch.tensor(0.1), torch.tensor(3.0), 0, 255)),
    ("log2_fake_quant", lambda: (torch.rand(3, 4), torch.tensor(1.0), 16)),
    ("quantized_linear", lambda: (torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(3), None, None, None, 0, 0)),
    ("quantized_attention", lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), None, 0.5, torch.tensor(1 / 255), torch.tensor(0.0), "uniform", 0, 255, -1, False)),
])
def test_fake_implementations_agree_with_reference(op, args):
    torch.library.opcheck(getattr(lowbit, op).default, args(), test_utils=("test_schema", "test_faketensor"))
