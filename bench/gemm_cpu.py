"""The GEMMs under lowbit's CPU path alone, in the layouts the paths use: FP32 and bf16 ``F.linear``
(weight [N, K]) and int8 x int8 -> int32 ``torch._int_mm(codes, weight.t())`` (what the "cpu"
lowering calls), at the shapes of the compile benches, side by side in one process.

Whether int8 can beat FP32 on a CPU is decided here, below any graph: ``torch._int_mm`` is fast
only where ATen has a vectorised int8 kernel for the host (AVX512-VNNI / AMX); on an AVX2-only
host it is a slow fallback, and so is bf16 without AVX512-BF16. The last column is the candidate
for such hosts: PyTorch's quantized engine (``torch.ops.quantized.linear`` on prepacked
per-channel int8 weights and a uint8 activation with one scale, lowbit's static W8A8 form), which
fbgemm vectorises on AVX2. The device line names the ATen CPU capability, so a table can be
matched with the compile benches run on the same host.

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

RESULTS = Path(__file__).parent / "results" / "gemm_cpu.md"
SHAPES = {  # (rows M, inner K, columns N): the activation rows times a linear's weight
    "VAR-d16 last scale, CFG 2: mat_qkv": (512, 1024, 3072),
    "VAR-d16 last scale, CFG 2: ffn.fc1": (512, 1024, 4096),
    "VAR-d16 last scale, CFG 2: ffn.fc2": (512, 4096, 1024),
    "VAR-d16 fourth scale, CFG 2: ffn.fc1": (32, 1024, 4096),
    "shipped digits VAR last scale, CFG 32: ffn.fc1": (512, 128, 512),
    "PixArt-alpha block, 1,024 tokens x 2: ff.net.0": (2048, 1152, 4608),
}


def _median_ms(fn, rounds: int) -> float:
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
    engine = torch.backends.quantized.engine
    lines = ["| GEMM | M x K x N | FP32 ms | bf16 ms | int8 (_int_mm) ms | _int_mm vs FP32 | _int_mm vs bf16 | "
             f"int8 (quantized.linear, {engine}) ms | quantized.linear vs FP32 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    torch.manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        x, w = torch.randn(m, k), torch.randn(n, k)
        x16, w16 = x.bfloat16(), w.bfloat16()
        x8, w8 = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (n, k), dtype=torch.int8)
        fp32 = _median_ms(lambda: F.linear(x, w), args.rounds)
        bf16 = _median_ms(lambda: F.linear(x16, w16), args.rounds)
        int8 = _median_ms(lambda: torch._int_mm(x8, w8.t()), args.rounds)
        packed = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(n, dtype=torch.long), 0, torch.qint8), None)
        xq = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
        out_scale = float(x.abs().max() * w.abs().max() * k ** 0.5) / 127
        engine_ms = _median_ms(lambda: torch.ops.quantized.linear(xq, packed, out_scale, 128), args.rounds)
        lines.append(f"| {name} | {m} x {k} x {n} | {fp32:.1f} | {bf16:.1f} | {int8:.1f} | {fp32 / int8:.2f}x | {bf16 / int8:.2f}x "
                     f"| {engine_ms:.1f} | {fp32 / engine_ms:.2f}x |")
        print(lines[-1], flush=True)
    write_results(args.out, "bench/gemm_cpu.py", load_at_start, ["### one GEMM, median of the rounds", ""] + lines + [""])


if __name__ == "__main__":
    main()
