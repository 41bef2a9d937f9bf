"""Attention with log2-quantized probabilities and a full-precision start-token column (DGQ eq. 8-9).

``lowbit.ir.ops.quantized_attention`` with probs_scheme "log2" materializes the [N_q, N_kv]
probability matrix; this kernel never does. Probabilities are softmax(q kᵀ · scale) in float32;
the start-token column (key ``start_token``; -1: none) keeps its value, every other p becomes

    x_q = clamp(round(-log2(max(p, 1e-30) / s)), 0, levels - 1),   p_dq = s · 2^(-x_q)

(a tiny p clamps to levels - 1; it is never zeroed), and the output is p_dq V, with p_dq cast to
V's dtype first, as the reference. The scale s is static (a scalar tensor) or dynamic: the
maximum over the WHOLE tensor of the probabilities outside the start column. That global max is
why there are two passes: the first streams the keys once per query block for the softmax row
statistics (max, sum) and each row's largest non-start probability; a torch max over those rows
gives s; the second recomputes the scores, quantizes and multiplies by V.

Only ``attn_mask=None`` is supported: with a mask the caller falls back to the reference op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.common import TINY, interpreting, rint

__all__ = ["log2_attention", "log2_attention_reference"]

_TINY = tl.constexpr(TINY)


@triton.jit
def _scores(q, k_ptr, stride_kn, offs_n, offs_d, N_kv, D, sm_scale, F32: tl.constexpr):
    """q kᵀ · scale for one key block; -inf for keys past N_kv."""
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < N_kv) & (offs_d[None, :] < D), other=0.0)
    if F32:  # float32 inputs, or the interpreter (whose dot mishandles bfloat16): exact products, IEEE dot
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:  # bf16/fp16 products are exact in the float32 accumulator too
        s = tl.dot(q, tl.trans(k))
    return tl.where(offs_n[None, :] < N_kv, s * sm_scale, float("-inf"))


@triton.jit
def _load_q(q_ptr, stride_qn, offs_m, offs_d, N_q, D):
    return tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                   mask=(offs_m[:, None] < N_q) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, m_ptr, l_ptr, peak_ptr, H, N_q, N_kv, D, sm_scale, start_token,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
                      F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q(q_ptr + (bh // H) * sq_b + (bh % H) * sq_h, sq_n, offs_m, offs_d, N_q, D)
    k_ptr += (bh // H) * sk_b + (bh % H) * sk_h
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # largest score outside the start column
    for n0 in range(0, N_kv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, k_ptr, sk_n, offs_n, offs_d, N_kv, D, sm_scale, F32)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
        top = tl.maximum(top, tl.max(tl.where(offs_n[None, :] == start_token, float("-inf"), s), axis=1))
    rows = offs_m < N_q
    tl.store(m_ptr + bh * N_q + offs_m, m, mask=rows)
    tl.store(l_ptr + bh * N_q + offs_m, l, mask=rows)
    tl.store(peak_ptr + bh * N_q + offs_m, tl.exp(top - m) / l, mask=rows)


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, out_ptr, m_ptr, l_ptr, probs_scale_ptr, H, N_q, N_kv, D, DV, sm_scale,
                   start_token, levels, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_n,
                   F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < N_q
    q = _load_q(q_ptr + (bh // H) * sq_b + (bh % H) * sq_h, sq_n, offs_m, offs_d, N_q, D)
    k_ptr += (bh // H) * sk_b + (bh % H) * sk_h
    v_ptr += (bh // H) * sv_b + (bh % H) * sv_h
    m = tl.load(m_ptr + bh * N_q + offs_m, mask=rows, other=0.0)
    l = tl.load(l_ptr + bh * N_q + offs_m, mask=rows, other=1.0)
    s_p = tl.load(probs_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for n0 in range(0, N_kv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        p = tl.exp(_scores(q, k_ptr, sk_n, offs_n, offs_d, N_kv, D, sm_scale, F32) - m[:, None]) / l[:, None]
        code = tl.minimum(tl.maximum(-tl.log2(tl.div_rn(tl.maximum(p, _TINY), s_p)), 0.0), levels - 1.0)
        p_dq = tl.where(offs_n[None, :] == start_token, p, s_p * tl.exp2(-rint(code)))
        p_dq = tl.where(offs_n[None, :] < N_kv, p_dq, 0.0).to(v_ptr.dtype.element_ty)
        v = tl.load(v_ptr + offs_n[:, None] * sv_n + offs_dv[None, :],
                    mask=(offs_n[:, None] < N_kv) & (offs_dv[None, :] < DV), other=0.0)
        if F32:
            acc = tl.dot(p_dq.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p_dq, v, acc)
    out = out_ptr + bh * N_q * so_n + offs_m[:, None] * so_n + offs_dv[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & (offs_dv[None, :] < DV))


def log2_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, levels: int, start_token: int = -1,
                   probs_scale: Tensor | None = None) -> Tensor:
    """q [B, H, N_q, D], k [B, H, N_kv, D], v [B, H, N_kv, Dv] (one float dtype, any strides with a unit
    last stride) -> [B, H, N_q, Dv] in v's dtype, contiguous.

    ``scale``: the softmax scale. ``levels``: 2^bits (lowbit's probs_qmax + 1). ``start_token``: the key
    column kept in full precision, -1 for none. ``probs_scale``: a one-element tensor (static) or None
    (dynamic: the max probability outside the start column, over the whole tensor).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be [B, H, N, D]")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k and v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n_q, d = q.shape
    n_kv, dv = k.shape[2], v.shape[3]
    if k.shape != (b, h, n_kv, d) or v.shape[:3] != (b, h, n_kv):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not -1 <= start_token < n_kv:
        raise ValueError(f"start_token must be -1 or a key index below {n_kv}; got {start_token}")
    if probs_scale is not None and probs_scale.numel() != 1:
        raise ValueError("probs_scale must hold one value (per tensor)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, h, n_q, dv), dtype=v.dtype, device=q.device)
    if out.numel() == 0:
        return out
    stats = torch.empty((3, b * h, n_q), dtype=torch.float32, device=q.device)
    block_m, block_n = (16, 16) if interpreting() else (64, 64)
    grid = (triton.cdiv(n_q, block_m), b * h)
    f32 = q.dtype == torch.float32 or interpreting()
    block_d = max(16, triton.next_power_of_2(d))
    _row_stats_kernel[grid](q, k, stats[0], stats[1], stats[2], h, n_q, n_kv, d, scale, start_token,
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            F32=f32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    if probs_scale is None:
        s_p = stats[2].amax().clamp_min(TINY).reshape(1)
    else:
        s_p = probs_scale.to(device=q.device, dtype=torch.float32).reshape(1)
    _attend_kernel[grid](q, k, v, out, stats[0], stats[1], s_p, h, n_q, n_kv, d, dv, scale, start_token, levels,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2), out.stride(2),
                         F32=f32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                         BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    return out


def log2_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, levels: int, start_token: int = -1,
                             probs_scale: Tensor | None = None) -> Tensor:
    """Plain-PyTorch ``log2_attention`` (the probability matrix materialized)."""
    probs = torch.softmax(torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale, dim=-1)
    others = torch.ones(probs.shape[-1], dtype=torch.bool, device=probs.device)
    if start_token >= 0:
        others[start_token] = False
    s = probs[..., others].amax().clamp_min(TINY) if probs_scale is None else probs_scale.float().reshape(())
    code = torch.clamp(torch.round(-torch.log2(probs.clamp_min(TINY) / s)), 0, levels - 1)
    p_dq = torch.where(others, s * torch.exp2(-code), probs)
    return torch.matmul(p_dq.to(v.dtype), v)
