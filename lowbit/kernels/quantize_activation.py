"""Fused activation quantizers: float activations to the int8 codes the GEMM kernels read.

A W8A8 layer is only as fast as the pass that quantizes its input, so that pass is one kernel
reading x once (twice per row for the dynamic per-token absmax) and writing int8:

- ``quantize_per_token``: dynamic symmetric, one scale per row = absmax / 127.
- ``quantize_dynamic``: dynamic asymmetric, one (scale, zero point) per row from the row's own
  min-max (LiteVAR's dynamic quantization, ``lowbit.dynamic_params``): the range, then the codes,
  in one kernel.
- ``quantize_static``: lowbit's static asymmetric activations (DGQ eq. 1, per tensor, per
  timestep, or per row for token groups). lowbit's codes are unsigned, q in [qmin, qmax] within
  [0, 255]; they are stored as the int8 q - 128, so the GEMMs take the zero point z - 128.
- ``quantize_gathered``: the same, for DGQ's channel groups: gathers the input channels into the
  group-contiguous, zero-padded layout of group_gemm and uses each column's group parameters.

Rounding is round-half-to-even after an IEEE division, as ``lowbit.ir.ops``: results are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.common import TINY, interpreting, UINT8_OFFSET, affine_code, per_row, rint

__all__ = [
    "quantize_dynamic",
    "quantize_gathered",
    "quantize_per_token",
    "quantize_per_token_reference",
    "quantize_static",
    "quantize_static_reference",
]

_TINY = tl.constexpr(TINY)
_EPS = tl.constexpr(1e-8)  # the smallest scale, as lowbit.ir.ops
_OFFSET = tl.constexpr(float(UINT8_OFFSET))


def _tiles() -> tuple[int, int]:
    return (16, 32) if interpreting() else (4, 512)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < M
    absmax = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = rows[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = tl.maximum(tl.div_rn(absmax, 127.0), _TINY)
    tl.store(scale_ptr + offs_m, scale, mask=rows)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = rows[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = affine_code(x, scale[:, None], 0.0, -127.0, 127.0)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _dynamic_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, M, K, stride_xm, stride_qm, qmin, qmax,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < M
    lo = tl.zeros((BLOCK_M,), tl.float32)  # starting at 0 keeps 0 in the range, as the reference's clamps do
    hi = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = rows[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))
    scale = tl.maximum(tl.div_rn(hi - lo, qmax - qmin), _EPS)
    zp = tl.minimum(tl.maximum(rint(qmin - tl.div_rn(lo, scale)), qmin), qmax)
    tl.store(scale_ptr + offs_m, scale, mask=rows)
    tl.store(zp_ptr + offs_m, zp, mask=rows)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = rows[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = affine_code(x, scale[:, None], zp[:, None], qmin, qmax) - _OFFSET
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _static_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, columns_ptr, groups_ptr, M, K_in, K_out, stride_xm, stride_qm,
                   scale_stride, zp_stride, qmin, qmax, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m < M
    out_cols = offs_k < K_out
    if GATHER:  # column j reads input channel columns[j] (-1: padding) with the parameters of group groups[j]
        src = tl.load(columns_ptr + offs_k, mask=out_cols, other=-1)
        s_idx = tl.load(groups_ptr + offs_k, mask=out_cols, other=0)[None, :] + 0 * offs_m[:, None]
        z_idx = s_idx
    else:  # parameters per row (stride 1) or per tensor (stride 0)
        src = offs_k
        s_idx = offs_m[:, None] * scale_stride + 0 * offs_k[None, :]
        z_idx = offs_m[:, None] * zp_stride + 0 * offs_k[None, :]
    valid = rows[:, None] & ((src >= 0) & (src < K_in))[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=valid, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + s_idx, mask=valid, other=1.0)
    zp = tl.load(zp_ptr + z_idx, mask=valid, other=0.0)
    q = tl.where(valid, affine_code(x, scale, zp, qmin, qmax) - _OFFSET, 0.0)
    mask = rows[:, None] & out_cols[None, :]
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)


def _check_input(x: Tensor) -> Tensor:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"expected a float [M, K] activation matrix; got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_range(qmin: int, qmax: int) -> None:
    if not 0 <= qmin <= qmax <= 255:
        raise ValueError(f"static activations use unsigned codes within [0, 255]; got [{qmin}, {qmax}]")


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] float -> (q int8 [M, K], scale float32 [M]): q = round(x / s), s = max(absmax(row) / 127, 1e-30)."""
    x = _check_input(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block_m, block_k = _tiles()
        _per_token_kernel[(triton.cdiv(m, block_m),)](x, q, scale, m, k, x.stride(0), q.stride(0),
                                                       BLOCK_M=block_m, BLOCK_K=block_k)
    return q, scale


def quantize_dynamic(x: Tensor, qmin: int = 0, qmax: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] float -> (codes int8 [M, K] stored as q - 128, scale [M], zero point [M]), each row on
    its own min-max range (held to contain 0): exactly ``lowbit.ir.ops.dynamic_params`` and the
    uniform quantizer, in one kernel."""
    x = _check_input(x)
    _check_range(qmin, qmax)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    zp = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block_m, block_k = _tiles()
        _dynamic_kernel[(triton.cdiv(m, block_m),)](x, q, scale, zp, m, k, x.stride(0), q.stride(0), float(qmin), float(qmax),
                                                     BLOCK_M=block_m, BLOCK_K=block_k)
    return q, scale, zp


def _launch_static(x: Tensor, scale: Tensor, zp: Tensor, strides: tuple[int, int], columns: Tensor | None,
                   groups: Tensor | None, k_out: int, qmin: int, qmax: int) -> Tensor:
    _check_range(qmin, qmax)
    m, k_in = x.shape
    q = torch.empty((m, k_out), dtype=torch.int8, device=x.device)
    if m and k_out:
        block_m, block_k = _tiles()
        grid = (triton.cdiv(m, block_m), triton.cdiv(k_out, block_k))
        gather = columns is not None
        _static_kernel[grid](x, q, scale, zp, columns if gather else scale, groups if gather else scale,
                             m, k_in, k_out, x.stride(0), q.stride(0), *strides, float(qmin), float(qmax),
                             GATHER=gather, BLOCK_M=block_m, BLOCK_K=block_k)
    return q


def quantize_static(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int = 0,
                    qmax: int = 255) -> Tensor:
    """x [M, K] float -> int8 [M, K] codes clamp(round(x / s) + z, qmin, qmax) - 128.

    ``scale``/``zero_point``: scalars (per tensor / per timestep) or [M] (per row); z in lowbit's
    unsigned code space. The GEMMs then take the zero point z - 128.
    """
    x = _check_input(x)
    s, s_stride = per_row(scale, x.shape[0], x.device)
    z, z_stride = per_row(zero_point, x.shape[0], x.device)
    return _launch_static(x, s, z, (s_stride, z_stride), None, None, x.shape[1], qmin, qmax)


def quantize_gathered(x: Tensor, columns: Tensor, column_group: Tensor, group_scale: Tensor,
                      group_zero_point: Tensor, qmin: int = 0, qmax: int = 255) -> Tensor:
    """x [M, K] float -> int8 [M, len(columns)]: column j is input channel ``columns[j]`` quantized as above
    with group ``column_group[j]``'s scale and zero point ([G] each, unsigned space); -1 marks a zero column."""
    x = _check_input(x)
    s = group_scale.to(device=x.device, dtype=torch.float32).contiguous()
    z = group_zero_point.to(device=x.device, dtype=torch.float32).contiguous()
    if s.shape != z.shape or s.dim() != 1:
        raise ValueError(f"group scale and zero point must both be [G]; got {tuple(s.shape)} and {tuple(z.shape)}")
    return _launch_static(x, s, z, (0, 0), columns.to(x.device, torch.int32).contiguous(),
                          column_group.to(x.device, torch.int32).contiguous(), columns.numel(), qmin, qmax)


def quantize_per_token_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch ``quantize_per_token``."""
    scale = (x.float().abs().amax(dim=1) / 127).clamp_min(TINY)
    return torch.clamp(torch.round(x.float() / scale[:, None]), -127, 127).to(torch.int8), scale


def quantize_static_reference(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int = 0, qmax: int = 255) -> Tensor:
    """Plain-PyTorch ``quantize_static``; scale and zero point broadcast against x (e.g. [M, 1] or [K])."""
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)
    return (q - UINT8_OFFSET).to(torch.int8)
