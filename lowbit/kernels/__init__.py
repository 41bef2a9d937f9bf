"""Triton kernels for lowbit's quantized ops, each with a plain-PyTorch reference.

Plain compute: imports torch and triton only. One kernel per module (``common`` holds the pieces
they share); import the module you need, after setting ``TRITON_INTERPRET=1`` if the kernels
should run on CPU tensors (tests do this in tests/conftest.py).

- ``quantize_activation``: float activations -> int8 codes (dynamic per token; static per tensor,
  per row, or gathered into DGQ's channel-group layout).
- ``int8_gemm``: W8A8 GEMM with the fused dequantize + bias epilogue.
- ``int4_gemm``: W4A8, int4 weights packed two per byte.
- ``group_gemm``: DGQ's per-channel-group activation parameters, applied per K-block.
- ``log2_attention``: attention with log2-quantized probabilities and a full-precision start column.
"""
