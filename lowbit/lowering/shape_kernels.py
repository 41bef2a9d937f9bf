"""Kernels compiled by inductor once per static shape, for the lowerings' opaque ops.

An opaque op (its body runs at run time, unseen by the surrounding graph) can still run inductor's
code: it calls a function compiled for the exact shapes it meets. The surrounding graph may then
have dynamic token counts (a VAR's scales) while each kernel is static, which is what inductor's
CPU templates compile correctly (FlexAttention; README) and fastest.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["SHAPES_PER_KERNEL", "per_shape"]

SHAPES_PER_KERNEL = 64  # a VAR meets one shape per scale (2K: 13), and a last short tile per shape


def per_shape(fn: Callable) -> Callable:
    """``fn`` compiled once per static shape, with room for ``SHAPES_PER_KERNEL`` shapes (dynamo's
    default limit, 8, would drop a VAR's later scales to eager)."""
    compiled = torch.compile(fn, dynamic=False)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=SHAPES_PER_KERNEL):
            return compiled(*args)

    return run
