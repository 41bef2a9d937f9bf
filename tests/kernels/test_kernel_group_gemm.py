"""DGQ group GEMM: the weight layout, the gathering quantizer, the kernel against its reference and
against lowbit's quantized_linear with per-channel (group-expanded) activation parameters.

Tolerances: each group's int32 partial sum is exact and folded in the reference's order, so the
interpreter matches the reference exactly; a GPU may fuse each fold's multiply-add into an FMA,
hence rtol 1e-6 / atol 1e-5 (outputs of magnitude <= ~50). Against lowbit's op, that op's own
float32 matmul rounding bounds the difference, as in test_kernel_int8_gemm.
"""

import pytest
import torch

from lowbit.ir.schema import QuantizedLinear
from lowbit.kernels.group_gemm import group_gemm, group_gemm_reference, prepare_grouped_weight, quantize_grouped
from lowbit.kernels.int8_gemm import int8_gemm, prepare_weight
from lowbit.kernels.quantize_activation import quantize_static, quantize_static_reference

quantized_linear = QuantizedLinear.overload()

M, K, N, G = 37, 70, 45, 4


def _operands(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, :3] *= 20  # outlier channels, their own group below
    labels = torch.randint(0, 2, (K,), generator=g)
    labels[:3] = 3  # group 2 stays empty: a zero-width segment
    weight = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(N, generator=g) * 0.01 + 1e-3
    group_scale = torch.tensor([0.02, 0.03, 0.5, 0.4])
    group_zero_point = torch.tensor([120.0, 131.0, 128.0, 128.0])
    bias = torch.randn(N, generator=g)
    return [t.to(device) for t in (x, labels, weight, weight_scale, group_scale, group_zero_point, bias)]


def test_layout_groups_channels_contiguously(device):
    _, labels, weight, weight_scale, *_ = _operands(device)
    prepared = prepare_grouped_weight(weight, weight_scale, labels, num_groups=G, block_k=16)
    segments = prepared.segments.tolist()
    counts = torch.bincount(labels, minlength=G).tolist()
    assert segments[0] == 0 and all(b - a == -(-c // 16) * 16 for a, b, c in zip(segments, segments[1:], counts))
    columns = prepared.columns.long()
    real = columns >= 0
    assert sorted(columns[real].tolist()) == list(range(K))  # every channel exactly once
    assert torch.equal(labels[columns[real]], prepared.column_group.long()[real])
    assert torch.equal(prepared.data[:, real], weight[:, columns[real]]) and not prepared.data[:, ~real].any()
    for g in range(G):
        assert torch.equal(prepared.group_sum[g].long(), weight[:, labels == g].long().sum(1))


def test_quantize_grouped_uses_each_channels_group(device):
    x, labels, weight, weight_scale, group_scale, group_zero_point, _ = _operands(device)
    prepared = prepare_grouped_weight(weight, weight_scale, labels, num_groups=G)
    a = quantize_grouped(x, prepared, group_scale, group_zero_point)
    columns = prepared.columns.long()
    expected = quantize_static_reference(x, group_scale[labels], group_zero_point[labels])
    assert torch.equal(a[:, columns >= 0], expected[:, columns[columns >= 0]])
    assert not a[:, columns < 0].any()


@pytest.mark.parametrize("with_zero_point", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(device, with_zero_point, with_bias):
    x, labels, weight, weight_scale, group_scale, group_zero_point, bias = _operands(device, seed=1)
    prepared = prepare_grouped_weight(weight, weight_scale, labels, num_groups=G)
    zp = group_zero_point if with_zero_point else torch.full_like(group_zero_point, 128)
    a = quantize_grouped(x, prepared, group_scale, zp)
    shifted = zp - 128 if with_zero_point else None
    bias = bias if with_bias else None
    y = group_gemm(a, prepared, group_scale, shifted, bias)
    a_original = quantize_static_reference(x, group_scale[labels], zp[labels])
    ref = group_gemm_reference(a_original, weight, weight_scale, labels, group_scale, shifted, bias)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)


def test_matches_lowbit_quantized_linear(device):
    x, labels, weight, weight_scale, group_scale, group_zero_point, bias = _operands(device, seed=2)
    prepared = prepare_grouped_weight(weight, weight_scale, labels, num_groups=G)
    a = quantize_grouped(x, prepared, group_scale, group_zero_point)
    y = group_gemm(a, prepared, group_scale, group_zero_point - 128, bias, out_dtype=torch.float32)
    # group_activations expands the group parameters to one per channel; the op broadcasts them
    s, z = group_scale[labels], group_zero_point[labels]
    ref = quantized_linear(x, weight, weight_scale, bias, s, z, 0, 255)
    x_dq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    terms = x_dq.abs() @ (weight.float() * weight_scale[:, None]).abs().T
    assert ((y - ref).abs() <= K * torch.finfo(torch.float32).eps * terms + 1e-5).all()


def test_one_group_is_the_per_tensor_gemm(device):
    x, _, weight, weight_scale, _, _, bias = _operands(device, seed=3)
    prepared = prepare_grouped_weight(weight, weight_scale, torch.zeros(K, dtype=torch.long, device=device))
    scale, zp = torch.tensor([0.03], device=device), torch.tensor([126.0], device=device)
    y = group_gemm(quantize_grouped(x, prepared, scale, zp), prepared, scale, zp - 128, bias)
    a = quantize_static(x, scale, zp)
    assert torch.equal(y, int8_gemm(a, prepare_weight(weight, weight_scale), scale, zp - 128, bias))


def test_rejects_mismatched_group_parameters(device):
    x, labels, weight, weight_scale, *_ = _operands(device)
    prepared = prepare_grouped_weight(weight, weight_scale, labels, num_groups=G)
    a = torch.zeros(M, prepared.data.shape[1], dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="group scales"):
        group_gemm(a, prepared, torch.ones(G - 1, device=device))
    with pytest.raises(ValueError, match="labels"):
        prepare_grouped_weight(weight, weight_scale, labels, num_groups=2)
