"""W8A8 GEMM against its reference and against lowbit's quantized_linear.

Tolerances. Against ``gemm_reference``: the int32 accumulation is exact and the epilogue is the
same three float32 operations in the same order, so under the interpreter the results are
identical; a GPU may contract the multiply and the bias add into one FMA (one rounding fewer),
hence rtol 1e-6 / atol 1e-5 on outputs of magnitude <= ~30, a few float32 ulps. Against lowbit's
quantized_linear, which multiplies dequantized float32 values, that op's own rounding is the
error: at most K float32 roundings of the sum of |terms| (``_fp32_matmul_bound``).
"""

import pytest
import torch

from lowbit.ir.schema import QuantizedLinear
from lowbit.kernels.common import gemm_reference
from lowbit.kernels.int4_gemm import prepare_int4_weight
from lowbit.kernels.int8_gemm import int8_gemm, prepare_weight
from lowbit.kernels.quantize_activation import quantize_per_token, quantize_static

quantized_linear = QuantizedLinear.overload()

M, K, N = 37, 70, 45  # ragged against every block size


def _operands(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    weight = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(N, generator=g) * 0.01 + 1e-3
    bias = torch.randn(N, generator=g)
    return x.to(device), weight.to(device), weight_scale.to(device), bias.to(device)


def _fp32_matmul_bound(x_dq, w_dq, k):
    return k * torch.finfo(torch.float32).eps * (x_dq.abs() @ w_dq.abs().T) + 1e-6


@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "per_row"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(device, mode, with_bias):
    x, weight, weight_scale, bias = _operands(device)
    bias = bias if with_bias else None
    if mode == "per_token":  # dynamic symmetric: no zero point
        a, a_scale = quantize_per_token(x)
        a_zp = None
    elif mode == "per_tensor":
        a_scale, a_zp = 0.03, 5.0
        a = quantize_static(x, a_scale, a_zp + 128)
    else:  # token groups
        a_scale = torch.rand(M, device=device) * 0.05 + 0.01
        a_zp = torch.randint(-20, 20, (M,), device=device).float()
        a = quantize_static(x, a_scale, a_zp + 128)
    y = int8_gemm(a, prepare_weight(weight, weight_scale), a_scale, a_zp, bias)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, gemm_reference(a, weight, weight_scale, a_scale, a_zp, bias), rtol=1e-6, atol=1e-5)


def test_power_of_two_scales_are_exact(device):
    # Every product is exact and the bias add rounds once, so even an FMA gives the same bits.
    x, weight, _, _ = _operands(device, seed=1)
    weight_scale = 2.0 ** -torch.randint(4, 9, (N,), device=device).float()
    bias = torch.randint(-64, 64, (N,), device=device).float() / 8
    a = quantize_static(x, 1 / 32, 128 + 3)
    y = int8_gemm(a, prepare_weight(weight, weight_scale), 1 / 32, 3.0, bias)
    assert torch.equal(y, gemm_reference(a, weight, weight_scale, 1 / 32, 3.0, bias))


@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_lowbit_quantized_linear(device, dynamic):
    x, weight, weight_scale, bias = _operands(device, seed=2)
    if dynamic:
        a, a_scale = quantize_per_token(x)
        y = int8_gemm(a, prepare_weight(weight, weight_scale), a_scale, None, bias)
        s, z, qmin, qmax = a_scale[:, None], torch.zeros(M, 1, device=device), -128, 127
    else:  # lowbit's static asymmetric uint8 activations, shifted to int8 by 128
        s, z, qmin, qmax = torch.tensor(0.02, device=device), torch.tensor(131.0, device=device), 0, 255
        a = quantize_static(x, s, z, qmin, qmax)
        y = int8_gemm(a, prepare_weight(weight, weight_scale), s, z - 128, bias)
    ref = quantized_linear(x, weight, weight_scale, bias, s, z, qmin, qmax)
    x_dq = (a.float() - (0 if dynamic else z - 128)) * s
    bound = _fp32_matmul_bound(x_dq, weight.float() * weight_scale[:, None], K)
    assert ((y - ref).abs() <= bound).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_output(device, out_dtype):
    x, weight, weight_scale, bias = _operands(device, seed=3)
    a, a_scale = quantize_per_token(x)
    y = int8_gemm(a, prepare_weight(weight, weight_scale), a_scale, None, bias, out_dtype=out_dtype)
    ref = gemm_reference(a, weight, weight_scale, a_scale, None, bias, out_dtype)
    assert y.dtype == out_dtype
    # One ulp of the output dtype: Triton's interpreter truncates float32 -> bfloat16 where CUDA rounds.
    ulp = torch.finfo(out_dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), rtol=ulp, atol=ulp)


def test_prepare_weight_and_operand_checks(device):
    _, weight, weight_scale, _ = _operands(device)
    prepared = prepare_weight(weight, weight_scale)
    assert prepared.data.dtype == torch.int8 and prepared.data.shape == (N, K)
    assert torch.equal(prepared.sum.long(), weight.long().sum(1))
    a = torch.zeros(M, K, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="8-bit"):
        int8_gemm(a, prepare_int4_weight(weight.clamp(-8, 7), weight_scale), 1.0)
    with pytest.raises(ValueError, match="columns"):
        int8_gemm(a[:, 1:], prepared, 1.0)
    with pytest.raises(ValueError, match="per row"):
        int8_gemm(a, prepared, torch.ones(M + 1, device=device))
