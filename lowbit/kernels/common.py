"""What every kernel of lowbit.kernels shares: exact rounding, the dequantize epilogue, launch helpers.

The three GEMMs differ only in how they produce the integer accumulator (int8 weight, packed
int4 weight, one partial sum per activation group); what happens to it afterwards is written
once here, so all of them agree with one reference (``gemm_reference``) in the same
order of float operations.

Exactness on both targets: Triton's ``/`` on float32 is an approximate division on CUDA, so the
quantizers divide with ``tl.div_rn`` (IEEE round-to-nearest, like torch), and round half to even
with ``rint`` below (libdevice's rint does not run under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "interpreting",
    "TINY",
    "UINT8_OFFSET",
    "PreparedWeight",
    "affine_code",
    "dequantize_accumulator",
    "gemm_configs",
    "gemm_reference",
    "int_matmul",
    "launch_gemm",
    "new_output",
    "per_row",
    "rint",
    "store_output",
    "tiles",
    "tile_offsets",
]

def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors). Read when a kernel is launched:
    tile sizes follow it. (``@triton.jit`` itself reads the variable when a kernel module is imported.)"""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"



TINY = 1e-30  # smallest scale: an all-zero row quantizes to zeros instead of NaN (as lowbit.ir.ops)
UINT8_OFFSET = 128  # lowbit's unsigned activation code q in [0, 255] is stored as the int8 q - 128
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PreparedWeight:
    """A weight in the layout a GEMM kernel reads, prepared once per layer.

    ``data``: int8 [N, K] (bits 8, lowbit's out x in layout) or [N, ceil(K/2)] (bits 4, two values
    per byte along K, see int4_gemm.pack_int4). ``scale``: float32 [N], one per output channel.
    ``sum``: int32 [N], sum over K of the integer weight (for the activation zero point).
    """

    data: Tensor
    scale: Tensor
    sum: Tensor
    in_features: int
    bits: int

    @property
    def out_features(self) -> int:
        return self.data.shape[0]


@triton.jit
def rint(y):
    """Round half to even (torch.round), exactly, from floor: y - floor(y) is exact in float."""
    r = tl.floor(y)
    d = y - r
    odd = (r - 2.0 * tl.floor(0.5 * r)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def affine_code(x, scale, zero_point, qmin, qmax):
    """clamp(round(x / s) + z, qmin, qmax) in float32, z integer-valued (DGQ eq. 1).

    Clamping x / s to [qmin - z, qmax - z] before rounding gives the same result (integer
    bounds) and keeps inf out of rint.
    """
    y = tl.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, qmin - zero_point), qmax - zero_point)
    return rint(y) + zero_point


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile; GROUP_M row tiles share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def dequantize_accumulator(acc, offs_m, offs_n, M, N, a_scale_ptr, a_scale_stride, a_zp_ptr, a_zp_stride,
                           w_sum_ptr, HAS_ZP: tl.constexpr):
    """a_scale[m] * (acc[m, n] - a_zp[m] * w_sum[n]) in float32; the subtraction is exact in int32."""
    rows = offs_m < M
    if HAS_ZP:
        zp = tl.load(a_zp_ptr + offs_m * a_zp_stride, mask=rows, other=0.0).to(tl.int32)
        acc = acc - zp[:, None] * tl.load(w_sum_ptr + offs_n, mask=offs_n < N, other=0)[None, :]
    scale = tl.load(a_scale_ptr + offs_m * a_scale_stride, mask=rows, other=0.0)
    return scale[:, None] * acc.to(tl.float32)


@triton.jit
def store_output(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr):
    """out[m, n] = y[m, n] * w_scale[n] + bias[n], in the output's dtype."""
    cols = offs_n < N
    y = y * tl.load(w_scale_ptr + offs_n, mask=cols, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=cols, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & cols[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_configs(block_k: bool = True) -> list[triton.Config]:
    """Autotuning space: tiles for H100/H200 int8 tensor cores; one small tile under the interpreter.

    ``block_k=False`` leaves BLOCK_K out (the group GEMM's BLOCK_K is fixed by its weight layout).
    """
    if interpreting():
        shapes = [(32, 32, 32, 1, 4)]
    else:
        shapes = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
                  (64, 256, 128, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 5, 4)]
    configs = []
    for bm, bn, bk, stages, warps in shapes:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8} | ({"BLOCK_K": bk} if block_k else {})
        configs.append(triton.Config(meta, num_stages=stages, num_warps=warps))
    return configs


def per_row(value: Tensor | float, m: int, device: torch.device) -> tuple[Tensor, int]:
    """A per-tensor (scalar) or per-row ([M] or [M, 1]) parameter as float32 [M] plus its row stride (0 or 1)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.numel() == 1:
        return t.reshape(1).contiguous(), 0
    if t.numel() != m:
        raise ValueError(f"expected a scalar or one value per row ({m}); got shape {tuple(t.shape)}")
    return t.reshape(m).contiguous(), 1


def new_output(a: Tensor, in_features: int, n: int, bias: Tensor | None,
               out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Check a GEMM's int8 activations [M, K], bias and output dtype; allocate the [M, N] output, bias contiguous."""
    if a.dtype != torch.int8 or a.dim() != 2 or a.stride(-1) != 1:
        raise ValueError(f"activations must be a row-major int8 [M, K] matrix; got {a.dtype} {tuple(a.shape)}")
    if a.shape[1] != in_features:
        raise ValueError(f"activations have {a.shape[1]} columns, the weight {in_features} inputs")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}; got {out_dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}]; got {tuple(bias.shape)}")
    out = torch.empty((a.shape[0], n), dtype=out_dtype, device=a.device)
    return out, bias.contiguous() if bias is not None else None


def tiles(m: int, n: int):
    """The launch grid of a GEMM over [M, N] output tiles."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def launch_gemm(kernel, a: Tensor, w: PreparedWeight, a_scale, a_zero_point, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """Launch the int8 or int4 GEMM ``kernel`` (same signature) on prepared operands."""
    out, bias = new_output(a, w.in_features, w.out_features, bias, out_dtype)
    m, n = out.shape
    if m == 0:
        return out
    scale, scale_stride = per_row(a_scale, m, a.device)
    # without a zero point the kernel never reads it: the scale stands in as its pointer
    zp, zp_stride = per_row(a_zero_point, m, a.device) if a_zero_point is not None else (scale, 0)
    kernel[tiles(m, n)](a, w.data, out, scale, zp, w.scale, w.sum, bias if bias is not None else w.scale,
                        m, n, w.in_features, a.stride(0), w.data.stride(0), out.stride(0), scale_stride, zp_stride,
                        HAS_ZP=a_zero_point is not None, HAS_BIAS=bias is not None)
    return out


def int_matmul(a: Tensor, w: Tensor) -> Tensor:
    """a [M, K] @ w [N, K]^T for integer tensors, exactly, on any device (float64 holds every partial sum)."""
    return (a.double() @ w.double().T).to(torch.int64)


def gemm_reference(a: Tensor, weight: Tensor, weight_scale: Tensor, a_scale, a_zero_point=None,
                   bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """int8_gemm / int4_gemm in plain PyTorch, on the raw integer weight [N, K], in the kernels' order:
    (a_s[m] * (acc - a_zp[m] w_sum[n])) * w_s[n] + b[n]."""
    acc = int_matmul(a, weight)
    m = acc.shape[0]
    if a_zero_point is not None:
        zp = per_row(a_zero_point, m, acc.device)[0].expand(m)
        acc = acc - zp.to(torch.int64)[:, None] * weight.to(torch.int64).sum(dim=1)[None, :]
    scale = per_row(a_scale, m, acc.device)[0].expand(m)
    y = scale[:, None] * acc.to(torch.int32).float() * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)
