"""GPU kernel benchmark: lowbit's Triton W8A8 / W4A8 GEMMs against bf16 cuBLAS and torch._int_mm.

At PixArt-alpha's linear layers (hidden 1152; tokens M = 2 x 1024 and 2 x 4096: a CFG batch of
two at 512 and 1024 px; (K, N) = QKV, attention out, FFN up, FFN down), one process times side
by side, with CUDA events, after a warmup, the median of --reps calls (no L2 flush between calls,
so a weight of a few MB may stay in the 50 MB L2 for every kernel alike):

- bf16 ``F.linear`` (cuBLAS), the baseline;
- W8A8: dynamic per-token activation quantization + int8 GEMM with the fused dequantize + bias
  epilogue, and the GEMM alone on pre-quantized activations;
- W4A8: the same with packed int4 weights;
- DGQ W8A8: 8 static channel groups (gather + quantize, then the group GEMM);
- ``torch._int_mm``: cuBLASLt's int8 x int8 -> int32, without any dequantization (a reference point).

It prints and writes bench/results/kernels_gpu.md: time, speedup over bf16, achieved TOPS (the
GEMM's 2 M N K operations over the whole time, quantization included), the share of the device's
dense peak (NVIDIA data sheets; "unknown" for other devices), and each output's relative error
against the float32 product (quantization error, a sanity check).

    .venv/bin/python bench/kernels_gpu.py [--reps 100]   # needs a CUDA GPU
    .venv/bin/python bench/kernels_gpu.py --smoke        # tiny shapes on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS = (2 * 1024, 2 * 4096)
SHAPES = ((1152, 3 * 1152), (1152, 1152), (1152, 4608), (4608, 1152))  # (K, N)
SMOKE_TOKENS, SMOKE_SHAPES = (32,), ((64, 48),)
GROUPS = 8
# Dense (no 2:4 sparsity) tensor-core peaks, bf16 TFLOPS and int8 TOPS, keyed by
# torch.cuda.get_device_name(): half of the sparse figures NVIDIA's H100 / H200 data sheets quote.
PEAKS = {
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.4, 1978.9),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756.5, 1513.0),
    "NVIDIA H100 NVL": ("H100 NVL", 835.5, 1670.5),
    "NVIDIA H200": ("H200 SXM", 989.4, 1978.9),
    "NVIDIA H200 NVL": ("H200 NVL", 835.5, 1670.5),
}
RESULTS = Path(__file__).parent / "results" / "kernels_gpu.md"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--reps", type=int, default=100, help="timed calls per kernel and shape (median)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls after the first (which autotunes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown table to write (default bench/results/kernels_gpu.md; "
                             "with --smoke only when given)")
    return parser.parse_args()


def median_seconds(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(m: int, k: int, n: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The float32 reference output and, per kernel: (runs on int8 tensor cores?, output comparable to
    the reference?, the call)."""
    from lowbit.kernels.group_gemm import group_gemm, prepare_grouped_weight, quantize_grouped
    from lowbit.kernels.int4_gemm import int4_gemm, prepare_int4_weight
    from lowbit.kernels.int8_gemm import int8_gemm, prepare_weight
    from lowbit.kernels.quantize_activation import quantize_per_token

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, torch.bfloat16)
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
    ref = F.linear(x.float(), w.float(), bias.float())
    absmax = w.float().abs().amax(dim=1).clamp_min(1e-8)  # lowbit's symmetric per-channel weights
    w8_scale, w4_scale = absmax / 127, absmax / 7
    w8 = torch.round(w.float() / w8_scale[:, None]).clamp(-128, 127).to(torch.int8)
    w4 = torch.round(w.float() / w4_scale[:, None]).clamp(-8, 7).to(torch.int8)
    p8, p4 = prepare_weight(w8, w8_scale), prepare_int4_weight(w4, w4_scale)
    a, a_scale = quantize_per_token(x)
    labels = torch.arange(k, device=device) % GROUPS  # balanced groups, static ranges taken from x itself
    xf = x.float()
    lo = torch.stack([xf[:, labels == i].amin() for i in range(GROUPS)]).clamp_max(0)
    hi = torch.stack([xf[:, labels == i].amax() for i in range(GROUPS)]).clamp_min(0)
    g_scale = ((hi - lo) / 255).clamp_min(1e-8)
    g_zp = torch.round(-lo / g_scale).clamp(0, 255)
    grouped = prepare_grouped_weight(w8, w8_scale, labels)
    bf16 = torch.bfloat16

    def dynamic(gemm, weight):
        q, s = quantize_per_token(x)
        return gemm(q, weight, s, None, bias, bf16)

    return ref, {
        "bf16 F.linear (cuBLAS)": (False, True, lambda: F.linear(x, w, bias)),
        "W8A8 per-token quant + GEMM": (True, True, lambda: dynamic(int8_gemm, p8)),
        "W8A8 GEMM only": (True, True, lambda: int8_gemm(a, p8, a_scale, None, bias, bf16)),
        "W4A8 per-token quant + GEMM": (True, True, lambda: dynamic(int4_gemm, p4)),
        "W4A8 GEMM only": (True, True, lambda: int4_gemm(a, p4, a_scale, None, bias, bf16)),
        f"DGQ W8A8 {GROUPS} groups, quant + GEMM": (True, True, lambda: group_gemm(
            quantize_grouped(x, grouped, g_scale, g_zp), grouped, g_scale, g_zp - 128, bias, bf16)),
        "torch._int_mm (int32 out, no epilogue)": (True, False, lambda: torch._int_mm(a, w8.t())),
    }


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before lowbit.kernels is imported: its @triton.jit reads it
    elif not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py times GPU kernels and found no CUDA device; "
                 "`--smoke` runs its tiny CPU check under the Triton interpreter instead")
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter, smoke run)"
    label, peak_bf16, peak_int8 = PEAKS.get(name, ("unknown", None, None))
    warmup, reps = (0, 1) if args.smoke else (args.warmup, args.reps)
    tokens, shapes = (SMOKE_TOKENS, SMOKE_SHAPES) if args.smoke else (TOKENS, SHAPES)
    lines = [f"Device: {name} (peaks: {label}"
             + (f", dense bf16 {peak_bf16} TFLOPS, int8 {peak_int8} TOPS)" if peak_bf16 else ")")
             + f"; torch {torch.__version__}, triton {triton.__version__}; "
             f"median of {reps} calls after {warmup} warmup calls.",
             "", "| M | K | N | kernel | time (us) | speedup vs bf16 | TOPS | % of peak | rel. error vs fp32 |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in tokens:
        for k, n in shapes:
            ref, kernels = cases(m, k, n, device)
            baseline = None  # the first case, bf16
            for kernel, (int8, comparable, fn) in kernels.items():
                output = fn()  # the first call autotunes; its output gives the error column
                seconds = median_seconds(fn, device, warmup, reps)
                baseline = baseline or seconds
                tops = 2 * m * n * k / seconds / 1e12
                peak = peak_int8 if int8 else peak_bf16
                share = f"{100 * tops / peak:.1f}" if peak else "unknown"
                error = f"{((output.float() - ref).norm() / ref.norm()).item():.2e}" if comparable else "-"
                lines.append(f"| {m} | {k} | {n} | {kernel} | {seconds * 1e6:.1f} | {baseline / seconds:.2f} "
                             f"| {tops:.1f} | {share} | {error} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Triton kernels on the GPU: lowbit W8A8 / W4A8 against bf16 cuBLAS\n\n"
                       "Written by `bench/kernels_gpu.py`.\n\n" + text)


if __name__ == "__main__":
    main()
