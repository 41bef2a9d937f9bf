"""DGQ's group GEMM: input channels fall into G groups, each with its own activation scale and zero point.

DGQ (eq. 6-7) clusters the input channels of a layer into G range groups so that a few outlier
channels get a grid of their own. A GEMM cannot apply a different scale to every k, but it can
apply one per K-block: ``prepare_grouped_weight`` permutes the input channels once so each
group is contiguous and pads each group to a multiple of ``block_k`` with zero columns; the
kernel then accumulates each group's int8 x int8 partial product in int32 (exact) and folds it
into a float32 accumulator with that group's parameters,

    acc_f[m, n] += s_g * (acc_g[m, n] - z_g * w_sum_g[n]),   y = acc_f * w_scale[n] + bias[n]

``quantize_grouped`` gathers and quantizes the float activations into the same layout in one
pass. Grouping along tokens (DGQ's other outlier dimension) needs no kernel of its own: that is
int8_gemm with a per-row scale and zero point. The assignment is per calibrated timestep, so a
per-timestep layer prepares one GroupedWeight per timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.common import (dequantize_accumulator, gemm_configs, int_matmul, interpreting, new_output,
                                   store_output, tile_offsets, tiles)
from lowbit.kernels.quantize_activation import quantize_gathered

__all__ = ["GroupedWeight", "group_gemm", "group_gemm_reference", "prepare_grouped_weight", "quantize_grouped"]

def default_block_k() -> int:
    """The weight layout's K tile: padding per group costs up to block_k - 1 zero columns."""
    return 32 if interpreting() else 64


@dataclass(frozen=True)
class GroupedWeight:
    """A weight in group-contiguous layout. Kp = padded input width, a multiple of ``block_k``.

    ``data``: int8 [N, Kp]; column j is input channel ``columns[j]`` (-1: zero padding) of group
    ``column_group[j]``. ``segments``: int32 [G + 1], group g spans columns [segments[g],
    segments[g+1]). ``group_sum``: int32 [G, N], the weight summed over each group's channels.
    ``scale``: float32 [N], per output channel.
    """

    data: Tensor
    scale: Tensor
    group_sum: Tensor
    segments: Tensor
    columns: Tensor
    column_group: Tensor
    in_features: int
    block_k: int

    @property
    def num_groups(self) -> int:
        return self.segments.numel() - 1


@triton.autotune(configs=gemm_configs(block_k=False), key=["M", "N", "Kp"])
@triton.jit
def _group_gemm_kernel(a_ptr, w_ptr, out_ptr, g_scale_ptr, g_zp_ptr, segments_ptr, g_sum_ptr, w_scale_ptr, bias_ptr,
                       M, N, Kp, G, stride_am, stride_wn, stride_om, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m[:, None] < M
    cols = offs_n[None, :] < N
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(G):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(tl.load(segments_ptr + g), tl.load(segments_ptr + g + 1), BLOCK_K):
            k = k0 + offs_k  # groups are padded to whole blocks: no mask along K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=rows, other=0)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None], mask=cols, other=0)
            acc = tl.dot(a, w, acc)
        # the group's scalar parameters, read through the per-row epilogue with row stride 0
        acc_f += dequantize_accumulator(acc, offs_m, offs_n, M, N, g_scale_ptr + g, 0, g_zp_ptr + g, 0,
                                        g_sum_ptr + g * N, HAS_ZP)
    store_output(acc_f, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


def prepare_grouped_weight(weight: Tensor, weight_scale: Tensor, labels: Tensor, num_groups: int | None = None,
                           block_k: int | None = None) -> GroupedWeight:
    """lowbit's int8 weight [N, K], per-channel scale [N] and group label of every input channel [K] (0..G-1)."""
    if weight.dim() != 2 or labels.shape != (weight.shape[1],):
        raise ValueError(f"expected an [N, K] weight and K labels; got {tuple(weight.shape)}, {tuple(labels.shape)}")
    device = weight.device
    labels = labels.to(device=device, dtype=torch.int64)
    g = int(labels.max()) + 1 if num_groups is None else num_groups
    if labels.min() < 0 or labels.max() >= g:
        raise ValueError(f"labels must lie in [0, {g})")
    counts = torch.bincount(labels, minlength=g)
    block_k = block_k or default_block_k()
    padded = (counts + block_k - 1) // block_k * block_k
    segments = torch.cat([padded.new_zeros(1), padded.cumsum(0)])
    order = torch.sort(labels, stable=True).indices  # channels, group by group
    first = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])  # of each group within ``order``
    sorted_labels = labels[order]
    dest = segments[sorted_labels] + torch.arange(labels.numel(), device=device) - first[sorted_labels]
    kp = int(segments[-1])
    columns = torch.full((kp,), -1, dtype=torch.int64, device=device)
    columns[dest] = order
    column_group = torch.repeat_interleave(torch.arange(g, device=device), padded)
    data = torch.zeros((weight.shape[0], kp), dtype=torch.int8, device=device)
    data[:, dest] = weight[:, order].to(torch.int8)
    group_sum = torch.zeros((g, weight.shape[0]), dtype=torch.int64, device=device)
    group_sum.index_add_(0, labels, weight.T.to(torch.int64))
    scale = weight_scale.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    return GroupedWeight(data, scale, group_sum.to(torch.int32), segments.to(torch.int32), columns.to(torch.int32),
                         column_group.to(torch.int32), weight.shape[1], block_k)


def quantize_grouped(x: Tensor, weight: GroupedWeight, group_scale: Tensor, group_zero_point: Tensor,
                     qmin: int = 0, qmax: int = 255) -> Tensor:
    """x float [M, K] -> int8 [M, Kp] in the weight's layout; group_scale/group_zero_point [G], zero point
    in lowbit's unsigned space (the codes are q - 128, see quantize_activation)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} channels, the weight {weight.in_features} inputs")
    return quantize_gathered(x, weight.columns, weight.column_group, group_scale, group_zero_point, qmin, qmax)


def group_gemm(a: Tensor, weight: GroupedWeight, group_scale: Tensor, group_zero_point: Tensor | None = None,
               bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """a int8 [M, Kp] (from quantize_grouped) x grouped weight -> out_dtype [M, N].

    ``group_scale``/``group_zero_point``: [G]; the zero point in the int8 code space (z - 128),
    None for symmetric codes. ``bias``: [N] or None.
    """
    out, bias = new_output(a, weight.data.shape[1], weight.data.shape[0], bias, out_dtype)
    m, n = out.shape
    g = weight.num_groups
    scale = group_scale.to(device=a.device, dtype=torch.float32).contiguous()
    zp = group_zero_point.to(a.device, torch.float32).contiguous() if group_zero_point is not None else scale
    if scale.shape != (g,) or zp.shape != (g,):
        raise ValueError(f"expected [{g}] group scales and zero points; got {tuple(scale.shape)}, {tuple(zp.shape)}")
    if m:
        _group_gemm_kernel[tiles(m, n)](a, weight.data, out, scale, zp, weight.segments, weight.group_sum,
                                        weight.scale, bias if bias is not None else weight.scale, m, n,
                                        weight.data.shape[1], g, a.stride(0), weight.data.stride(0), out.stride(0),
                                        HAS_ZP=group_zero_point is not None, HAS_BIAS=bias is not None,
                                        BLOCK_K=weight.block_k)
    return out


def group_gemm_reference(a: Tensor, weight: Tensor, weight_scale: Tensor, labels: Tensor, group_scale: Tensor,
                         group_zero_point: Tensor | None = None, bias: Tensor | None = None,
                         out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Plain-PyTorch ``group_gemm`` in the original channel order: a int8 [M, K], weight [N, K], labels [K]."""
    acc_f = torch.zeros((a.shape[0], weight.shape[0]), dtype=torch.float32, device=a.device)
    for g in range(group_scale.numel()):
        cols = labels == g
        acc = int_matmul(a[:, cols], weight[:, cols])
        if group_zero_point is not None:
            acc = acc - int(group_zero_point[g]) * weight[:, cols].to(torch.int64).sum(dim=1)[None, :]
        acc_f += group_scale[g].float() * acc.to(torch.int32).float()
    y = acc_f * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)
