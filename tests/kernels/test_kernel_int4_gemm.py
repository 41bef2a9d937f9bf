"""W4A8 GEMM: packing, and the kernel against its reference, int8_gemm and lowbit's quantized_linear.

Tolerances as in test_kernel_int8_gemm (exact integer accumulation, same epilogue): rtol 1e-6 /
atol 1e-5 against the reference for a GPU's FMA contraction, equality with int8_gemm on the same
weight (the same epilogue code on the same accumulator), and quantized_linear's own float32
rounding bound against lowbit's op.
"""

import pytest
import torch

from lowbit.ir.schema import QuantizedLinear
from lowbit.kernels.common import gemm_reference
from lowbit.kernels.int4_gemm import int4_gemm, pack_int4, prepare_int4_weight, unpack_int4
from lowbit.kernels.int8_gemm import int8_gemm, prepare_weight
from lowbit.kernels.quantize_activation import quantize_per_token, quantize_static

quantized_linear = QuantizedLinear.overload()

M, N = 37, 45


def _operands(device, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, k, generator=g)
    weight = torch.randint(-8, 8, (N, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(N, generator=g) * 0.05 + 1e-3
    return x.to(device), weight.to(device), weight_scale.to(device), torch.randn(N, generator=g).to(device)


def test_pack_layout_and_round_trip(device):
    w = torch.tensor([[1, -2, 7], [-8, 0, -1]], dtype=torch.int8, device=device)
    packed = pack_int4(w)
    # byte j: w[2j] in the low nibble, w[2j+1] in the high one; the odd K is padded with 0
    assert packed.tolist() == [[(1 | 0xE0) - 256, 7], [0x08, 0x0F]]
    assert torch.equal(unpack_int4(packed, 3), w)
    every = torch.arange(-8, 8, dtype=torch.int8, device=device).repeat(3, 1)
    assert torch.equal(unpack_int4(pack_int4(every), 16), every)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 2), 8, device=device))


@pytest.mark.parametrize("k", [70, 69])  # even and odd K (a half-filled last byte)
@pytest.mark.parametrize("mode", ["per_token", "per_tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(device, k, mode, with_bias):
    x, weight, weight_scale, bias = _operands(device, k)
    bias = bias if with_bias else None
    if mode == "per_token":
        a, a_scale = quantize_per_token(x)
        a_zp = None
    else:
        a_scale, a_zp = 0.03, -7.0
        a = quantize_static(x, a_scale, a_zp + 128)
    prepared = prepare_int4_weight(weight, weight_scale)
    assert prepared.data.shape == (N, (k + 1) // 2)
    y = int4_gemm(a, prepared, a_scale, a_zp, bias)
    torch.testing.assert_close(y, gemm_reference(a, weight, weight_scale, a_scale, a_zp, bias), rtol=1e-6, atol=1e-5)
    assert torch.equal(y, int8_gemm(a, prepare_weight(weight, weight_scale), a_scale, a_zp, bias))


def test_matches_lowbit_quantized_linear(device):
    x, weight, weight_scale, bias = _operands(device, 70, seed=1)
    s, z = torch.tensor(0.02, device=device), torch.tensor(100.0, device=device)
    a = quantize_static(x, s, z)
    y = int4_gemm(a, prepare_int4_weight(weight, weight_scale), s, z - 128, bias, out_dtype=torch.float32)
    ref = quantized_linear(x, weight, weight_scale, bias, s, z, 0, 255)
    terms = ((a.float() + 128 - z) * s).abs() @ (weight.float() * weight_scale[:, None]).abs().T
    assert ((y - ref).abs() <= 70 * torch.finfo(torch.float32).eps * terms + 1e-6).all()


def test_rejects_an_int8_weight(device):
    _, weight, weight_scale, _ = _operands(device, 70)
    with pytest.raises(ValueError, match="4-bit"):
        int4_gemm(torch.zeros(M, 70, dtype=torch.int8, device=device), prepare_weight(weight, weight_scale), 1.0)
