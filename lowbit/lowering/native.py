"""lowbit's C++ CPU kernels (``csrc/``), compiled for the host on first use with ``torch.utils.cpp_extension``.

They use ATen's vector types at AVX512 width and ATen's brgemm (oneDNN's micro-kernels), so they
are built only where ATen itself runs its AVX512 kernels; elsewhere every caller keeps its portable
form (tiles, FlexAttention), and the build failure, if any, is said once.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch

__all__ = ["has_bf16_brgemm", "has_int8_brgemm", "native_built"]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [str(path) for path in sorted(_CSRC.glob("*.cpp"))]
# torch rebuilds when a source or a flag changes, not a header: the headers' digest goes in as a flag
_HEADERS = hashlib.sha1(b"".join(path.read_bytes() for path in sorted(_CSRC.glob("*.h")))).hexdigest()[:12]
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
          "-DCPU_CAPABILITY=AVX512", f"-DLOWBIT_HEADERS={_HEADERS}"]


@functools.cache
def native_built() -> bool:
    """Whether the kernels run on this host (an AVX512 CPU and a compiler); builds them on first call (~10 s)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        from torch.utils.cpp_extension import load

        load("lowbit_native", _SOURCES, extra_cflags=_FLAGS, is_python_module=False)
    except Exception as error:  # no compiler, or headers that do not match: the portable forms still run
        warnings.warn(f"lowbit: the C++ CPU kernels did not build ({error}); the portable forms run instead", stacklevel=2)
        return False
    return True


@functools.cache
def has_bf16_brgemm() -> bool:
    """Whether ATen's bf16 brgemm runs here (AMX or AVX512-BF16), which the integer attention kernel needs."""
    return native_built() and bool(torch.ops.lowbit_native.has_bf16_brgemm())


@functools.cache
def has_int8_brgemm() -> bool:
    """Whether ATen's u8 x s8 brgemm runs here (AMX or AVX512-VNNI), which the int4 linear kernel needs."""
    return native_built() and bool(torch.ops.lowbit_native.has_int8_brgemm())
