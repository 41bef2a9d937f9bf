"""W4A8 GEMM: int8 activations x int4 weights packed two per byte, same epilogue as int8_gemm.

Halving the weight bytes is what 4-bit weights buy on a GPU (the GEMMs of a diffusion
transformer at small batch read more weight than activation); Hopper has no int4 tensor core,
so each weight tile is unpacked to int8 in registers right after the load and the product runs
on the int8 MMA, with int8_gemm's dequantize + bias epilogue (from common).

Packing (``pack_int4``): weight [N, K] in [-8, 7] -> int8 [N, ceil(K/2)], byte j of row n holds
w[n, 2j] in its low nibble and w[n, 2j+1] in its high nibble (two's complement; an odd K is
padded with a zero).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.common import (PreparedWeight, dequantize_accumulator, gemm_configs, launch_gemm, store_output,
                                   tile_offsets)

__all__ = ["int4_gemm", "pack_int4", "prepare_int4_weight", "unpack_int4"]


@triton.autotune(configs=gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _int4_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, M, N, K,
                      stride_am, stride_wn, stride_om, a_scale_stride, a_zp_stride, HAS_ZP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    packed_k = (K + 1) // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0)
        byte = k0 // 2 + offs_byte
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :],
                         mask=(offs_n[:, None] < N) & (byte[None, :] < packed_k), other=0)
        low = (packed << 4) >> 4  # arithmetic shifts sign-extend each nibble
        high = packed >> 4
        w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # w[n, 2j], w[n, 2j + 1] side by side
        acc = tl.dot(a, tl.trans(w), acc)
    y = dequantize_accumulator(acc, offs_m, offs_n, M, N, a_scale_ptr, a_scale_stride, a_zp_ptr, a_zp_stride,
                               w_sum_ptr, HAS_ZP)
    store_output(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


def pack_int4(weight: Tensor) -> Tensor:
    """[N, K] integers in [-8, 7] -> int8 [N, ceil(K/2)], two per byte along K (low nibble first)."""
    if weight.dim() != 2:
        raise ValueError(f"expected an [N, K] weight; got {tuple(weight.shape)}")
    if weight.numel() and (weight.min() < -8 or weight.max() > 7):
        raise ValueError("int4 weights must lie in [-8, 7]")
    w = weight.to(torch.int16)
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    return ((w[:, 0::2] & 0xF) | (w[:, 1::2] << 4)).to(torch.int8).contiguous()  # int8 cast wraps the top bit


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of ``pack_int4``: int8 [N, ceil(K/2)] -> int8 [N, K]."""
    low = (packed << 4) >> 4
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features].contiguous()


def prepare_int4_weight(weight: Tensor, weight_scale: Tensor) -> PreparedWeight:
    """lowbit's integer weight [N, K] (values in [-8, 7]), or that weight already packed as ``pack_int4``
    packs it (uint8 [N, K/2], read in place: no copy), and per-channel scale [N] -> PreparedWeight (bits 4)."""
    packed_already = weight.dtype == torch.uint8
    data = weight.view(torch.int8) if packed_already else pack_int4(weight)
    in_features = 2 * weight.shape[1] if packed_already else weight.shape[1]
    scale = weight_scale.to(device=data.device, dtype=torch.float32).reshape(-1).contiguous()
    if scale.numel() != data.shape[0]:
        raise ValueError(f"expected one weight scale per output channel ({data.shape[0]}); got {scale.numel()}")
    w_sum = unpack_int4(data, in_features).to(torch.int32).sum(dim=1, dtype=torch.int32)
    return PreparedWeight(data.contiguous(), scale, w_sum, in_features, bits=4)


def int4_gemm(a: Tensor, weight: PreparedWeight, a_scale: Tensor | float, a_zero_point: Tensor | float | None = None,
              bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """a int8 [M, K] (row-major) x packed int4 weight -> out_dtype [M, N]; arguments as int8_gemm."""
    if weight.bits != 4:
        raise ValueError(f"int4_gemm takes a 4-bit PreparedWeight; got {weight.bits} bits")
    return launch_gemm(_int4_gemm_kernel, a, weight, a_scale, a_zero_point, bias, out_dtype)

