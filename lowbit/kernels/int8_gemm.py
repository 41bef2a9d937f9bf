"""W8A8 GEMM: int8 activations x int8 weights, int32 accumulation, fused dequantize + bias.

The point of W8A8 on Hopper is the int8 tensor cores (twice the bf16 rate); the point of fusing
the epilogue is that the int32 accumulator never goes to memory:

    y[m, n] = (a_scale[m] * (acc[m, n] - a_zp[m] * w_sum[n])) * w_scale[n] + bias[n]

with a_scale/a_zp per row (dynamic per token, token groups) or scalars (per tensor, per
timestep), w_scale per output channel, and w_sum[n] = sum_k w[n, k] precomputed once by
``prepare_weight``: an asymmetric activation code then costs one multiply-add per output.
The weight stays in lowbit's [N, K] (out x in) layout, K-major, which is what the int8 MMA wants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.common import (PreparedWeight, dequantize_accumulator, gemm_configs, launch_gemm, store_output,
                                   tile_offsets)

__all__ = ["int8_gemm", "prepare_weight"]


@triton.autotune(configs=gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, M, N, K,
                      stride_am, stride_wn, stride_om, a_scale_stride, a_zp_stride, HAS_ZP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None],  # [BLOCK_K, BLOCK_N] view of [N, K]
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0)
        acc = tl.dot(a, w, acc)
    y = dequantize_accumulator(acc, offs_m, offs_n, M, N, a_scale_ptr, a_scale_stride, a_zp_ptr, a_zp_stride,
                               w_sum_ptr, HAS_ZP)
    store_output(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


def prepare_weight(weight: Tensor, weight_scale: Tensor) -> PreparedWeight:
    """lowbit's integer weight [N, K] (values in [-128, 127]) and per-channel scale [N] -> PreparedWeight (bits 8)."""
    if weight.dim() != 2:
        raise ValueError(f"expected an [N, K] weight; got {tuple(weight.shape)}")
    if weight.numel() and (weight.min() < -128 or weight.max() > 127):
        raise ValueError("int8 weights must lie in [-128, 127]")
    data = weight.to(torch.int8).contiguous()
    scale = weight_scale.to(device=data.device, dtype=torch.float32).reshape(-1).contiguous()
    if scale.numel() != data.shape[0]:
        raise ValueError(f"expected one weight scale per output channel ({data.shape[0]}); got {scale.numel()}")
    return PreparedWeight(data, scale, data.sum(dim=1, dtype=torch.int32), data.shape[1], bits=8)


def int8_gemm(a: Tensor, weight: PreparedWeight, a_scale: Tensor | float, a_zero_point: Tensor | float | None = None,
              bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """a int8 [M, K] (row-major) x prepared weight -> out_dtype [M, N] (float32, bfloat16 or float16).

    ``a_scale``/``a_zero_point``: scalars or [M] (tensors on a's device avoid a copy per call); the
    zero point integer-valued, in the int8 code space (lowbit's unsigned z - 128, see
    quantize_static), None for symmetric codes. ``bias``: [N] or None.
    """
    if weight.bits != 8:
        raise ValueError(f"int8_gemm takes an 8-bit PreparedWeight; got {weight.bits} bits")
    return launch_gemm(_int8_gemm_kernel, a, weight, a_scale, a_zero_point, bias, out_dtype)

