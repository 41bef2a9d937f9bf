"""The GEMMs under lowbit's CPU path alone: FP32 and bf16 ``F.linear`` (weight [N, K]), int8 x int8 ->
int32 ``torch._int_mm(codes, weight.t())`` and what the "cpu" lowering calls, oneDNN on a weight
prepacked once (``lowbit.lowering.onednn.quantized_matmul``: uint8 codes with one scale and zero
point, float32 out, bias and scales in the call), at the shapes of the compile benches, side by
side in one process.

Whether int8 can beat bf16 on a CPU is decided here, below any graph: int8 is fast only where the
host has VNNI or AMX and bf16 only with AVX512-BF16 or AMX; ``torch._int_mm`` also reorders the
weight on every call. The device line names the ATen CPU capability, so a table can be matched with
the compile benches run on the same host.

    .venv/bin/python bench/gemm_cpu.py      # writes bench/results/gemm_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compile_cpu import write_results

from lowbit.lowering.onednn import quantized_matmul

RESULTS = Path(__file__).parent / "results" / "gemm_cpu.md"
SHAPES = {  # (rows M, inner K, columns N): the activation rows times a linear's weight
    "VAR-d16 last scale, CFG 2: mat_qkv": (512, 1024, 3072),
    "VAR-d16 last scale, CFG 2: ffn.fc1": (512, 1024, 4096),
    "VAR-d16 last scale, CFG 2: ffn.fc2": (512, 4096, 1024),
    "VAR-d16 fourth scale, CFG 2: ffn.fc1": (32, 1024, 4096),
    "shipped digits VAR last scale, CFG 32: ffn.fc1": (512, 128, 512),
    "PixArt-alpha block, 1,024 tokens x 2: ff.net.0": (2048, 1152, 4608),
}


def median_ms(fn, rounds: int) -> float:
    fn()  # first call: allocation, dispatch caches
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    lines = ["| GEMM | M x K x N | FP32 ms | bf16 ms | int8 (_int_mm) ms | _int_mm vs bf16 | int8 (lowbit, oneDNN prepacked) ms | "
             "lowbit vs FP32 | lowbit vs bf16 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    torch.manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        x, w = torch.randn(m, k), torch.randn(n, k)
        x16, w16 = x.bfloat16(), w.bfloat16()
        x8, w8 = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (n, k), dtype=torch.int8)
        fp32 = median_ms(lambda: F.linear(x, w), args.rounds)
        bf16 = median_ms(lambda: F.linear(x16, w16), args.rounds)
        int8 = median_ms(lambda: torch._int_mm(x8, w8.t()), args.rounds)
        codes, scale, zero_point = (x8.int() + 128).to(torch.uint8), torch.tensor(0.02), torch.tensor(128.0)
        weight_scale, bias = torch.rand(n) / 100, torch.randn(n)
        lowbit_ms = median_ms(lambda: quantized_matmul(codes, scale, zero_point, w8, weight_scale, bias), args.rounds)
        lines.append(f"| {name} | {m} x {k} x {n} | {fp32:.1f} | {bf16:.1f} | {int8:.1f} | {bf16 / int8:.2f}x "
                     f"| {lowbit_ms:.1f} | {fp32 / lowbit_ms:.2f}x | {bf16 / lowbit_ms:.2f}x |")
        print(lines[-1], flush=True)
    sections = ["### one GEMM, median of the rounds", ""] + lines + [""] + gelu_chain(args.rounds)
    write_results(args.out, "bench/gemm_cpu.py", load_at_start, sections)


def gelu_chain(rounds: int) -> list[str]:
    """PixArt's ff.net.0 with its GELU (tanh) and ff.net.2's input quantizer: the int8 GEMM's float32
    output then GELU and quantizer compiled by inductor, against one oneDNN call with GELU in the
    epilogue writing the codes (what the "cpu" lowering runs), and bf16's linear + GELU."""
    m, k, n = 2048, 1152, 4608
    x, w, bias = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n)
    codes, scale, zero_point = torch.randint(0, 256, (m, k), dtype=torch.uint8), torch.tensor(0.02), torch.tensor(128.0)
    w8, weight_scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 1000
    out_scale, out_zero_point = torch.tensor(0.01), torch.tensor(20.0)
    quantize_next = torch.compile(lambda y: torch.clamp(torch.round(F.gelu(y, approximate="tanh") / out_scale) + out_zero_point, 0, 255)
                                  .to(torch.uint8))
    forms = {
        "bf16: F.linear, GELU": lambda: F.gelu(F.linear(x, w, bias.bfloat16()), approximate="tanh"),
        "lowbit int8 GEMM (float32 out), then GELU + quantizer (inductor)":
            lambda: quantize_next(quantized_matmul(codes, scale, zero_point, w8, weight_scale, bias)),
        "lowbit one call: GELU in the epilogue, the next layer's codes out":
            lambda: quantized_matmul(codes, scale, zero_point, w8, weight_scale, bias, "tanh", out_scale, out_zero_point, torch.uint8),
    }
    times = {name: median_ms(fn, rounds) for name, fn in forms.items()}
    base = times["bf16: F.linear, GELU"]
    lines = ["### linear + GELU + the next layer's quantizer, PixArt-alpha ff.net.0 (2048 x 1152 x 4608)", "",
             "| form | ms | vs bf16 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ms:.1f} | {base / ms:.2f}x |" for name, ms in times.items()]
    print("\n".join(lines), flush=True)
    return lines + [""]


if __name__ == "__main__":
    main()
