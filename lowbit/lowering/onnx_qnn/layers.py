"""Weighted layers as the QNN HTP runs them: Gemm (2-D) and Conv with a DequantizeLinear weight.

A linear is a Gemm on the input flattened to 2-D (the HTP's FullyConnected; MatMul with a
constant weight plus an Add of an int32 bias is rejected, measured), with a bias always present
(a Gemm without one is rejected too). lowbit's integer weights go in as they are: int8, or ONNX
INT4 for weights of 4 bits or fewer, int16 above 8 bits, with lowbit's per-output-channel scale
on axis 0. Layers kept in full precision carry a float weight here; ``legalize.py`` gives them
int16 per-channel weights, and every bias becomes int32 at scale input_scale * weight_scale.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["conv", "gemm", "integer_weight"]


def integer_weight(em, qvalues: torch.Tensor, scale: torch.Tensor, bits: float, hint: str) -> str:
    """DequantizeLinear of lowbit's integer weight, symmetric, one scale per output channel (axis 0)."""
    channels = qvalues.shape[0]
    scale = scale.reshape(channels).float()
    s = em.graph.constant(scale, f"{hint}.scale")
    if bits <= 4:
        w = em.graph.int4_constant(qvalues, f"{hint}.int4", scale.numpy())
        z = em.graph.int4_constant(torch.zeros(channels, dtype=torch.int8), "zero_point", np.zeros(0))
    else:
        dtype = np.int8 if bits <= 8 else np.int16
        w = em.graph.integer_constant(qvalues, f"{hint}.int", dtype, scale.numpy())
        z = em.graph.constant(np.zeros(channels, dtype), "zero_point")
    return em.graph.node("DequantizeLinear", [w, s, z], axis=0)


def _bias(em, bias: torch.Tensor | None, channels: int, hint: str) -> str:
    return em.graph.constant(bias if bias is not None else torch.zeros(channels), f"{hint}.bias", dtype=np.float32)


def gemm(em, x: str, x_shape: tuple[int, ...], weight: str, channels: int, bias: torch.Tensor | None, hint: str) -> str:
    """y = x Wᵀ + b for x of any rank (flattened to 2-D around the Gemm)."""
    shape = lambda v: em.graph.constant(np.asarray(v, np.int64), "shape")  # noqa: E731
    flat = em.graph.node("Reshape", [x, shape([-1, x_shape[-1]])]) if len(x_shape) != 2 else x
    y = em.graph.node("Gemm", [flat, weight, _bias(em, bias, channels, hint)], transB=1)
    return em.graph.node("Reshape", [y, shape(list(x_shape[:-1]) + [channels])]) if len(x_shape) != 2 else y


def conv(em, x: str, x_shape: tuple[int, ...], weight: Callable[[tuple[int, ...] | None], str], weight_shape: tuple[int, ...],
         bias: torch.Tensor | None, stride, padding, dilation, groups: int, hint: str) -> str:
    """Conv; a patchify convolution (kernel = stride, no padding) as a Gemm over the patches.

    ``weight(shape)`` makes the weight initializer, reshaped to ``shape`` (None: as it is).
    Measured: the HTP's Conv followed by the flatten and transpose to tokens that every diffusion
    transformer's patch embedding does computes 2.6% (2x2 patches) to 6% (1x1) wrong, batches after
    the first worst; the Gemm form is exact to the 16-bit grids.
    """
    cout, cin, kh, kw = weight_shape
    patchify = list(stride) == [kh, kw] and list(padding) == [0, 0] and list(dilation) == [1, 1] and groups == 1
    if not patchify:
        return em.graph.node("Conv", [x, weight(None), _bias(em, bias, cout, hint)], strides=list(stride),
                             pads=list(padding) * 2, dilations=list(dilation), group=int(groups))
    b, _, h, w = x_shape
    ho, wo = h // kh, w // kw
    shape = lambda v: em.graph.constant(np.asarray(v, np.int64), "shape")  # noqa: E731
    rows = em.graph.node("Transpose", [em.graph.node("Reshape", [x, shape([b, cin, ho, kh, w])])], perm=[0, 2, 1, 3, 4])
    patches = em.graph.node("Transpose", [em.graph.node("Reshape", [rows, shape([b * ho, cin, kh, wo, kw])])], perm=[0, 3, 1, 2, 4])
    flat = em.graph.node("Reshape", [patches, shape([b * ho * wo, cin * kh * kw])])
    y = gemm(em, flat, (b * ho * wo, cin * kh * kw), weight((cout, cin * kh * kw)), cout, bias, hint)
    nhwc = em.graph.node("Reshape", [y, shape([b, ho, wo, cout])])
    return em.graph.node("Transpose", [nhwc], perm=[0, 3, 1, 2])
