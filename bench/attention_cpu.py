"""Quantized attention on the CPU, each form side by side in one process: lowbit's integer kernel
(codes on the bf16 matrix units), the reference arithmetic in query tiles, the reference arithmetic
whole as inductor compiles it (what the CPU target ran before), and SDPA in float32 and bf16 (the
attention of the FP32 and bf16-autocast baselines, probabilities unquantized).

q, k, v are on 8-bit min-max grids and the probabilities on a uniform 8-bit grid up to their
largest value (minmax-w8a8's attention: its calibrated range), measured on the first 256 queries.
Each row checks the form against the reference arithmetic (relative L2).

    .venv/bin/python bench/attention_cpu.py      # writes bench/results/attention_cpu.md
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from compile_cpu import write_results
from gemm_cpu import median_ms

from lowbit.ir.ops import attention_probs, attention_reference, uniform_quantize
from lowbit.lowering.integer_attention import integer_attention
from lowbit.lowering.native import has_bf16_brgemm
from lowbit.lowering.tiled_attention import TILE_SCORES, tiled_attention

RESULTS = Path(__file__).parent / "results" / "attention_cpu.md"
SHAPES = {  # batch, heads, tokens, head dim
    "shipped reference model, CFG batch 4 (65,536 scores)": (4, 4, 64, 32),
    "PixArt-alpha block, 256 tokens (2.1 M scores)": (2, 16, 256, 72),
    "PixArt-alpha block, 1,024 tokens": (2, 16, 1024, 72),
    "SD-1.x down block, 64x64 latent (4,096 tokens)": (2, 8, 4096, 40),
}


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.amax() - x.amin()) / 255
    return scale, torch.round(-x.amin() / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    reference_compiled = torch.compile(attention_reference, dynamic=False)
    lines = ["| shape | form | ms | vs bf16 SDPA | rel. L2 vs the reference arithmetic |", "| --- | --- | ---: | ---: | ---: |"]
    torch.manual_seed(0)
    for name, (batch, heads, tokens, dim) in SHAPES.items():
        x = [torch.randn(batch, heads, tokens, dim) for _ in range(3)]
        grids = [_grid(t) for t in x]
        q, k, v = (uniform_quantize(t, s, z, 0, 255) for t, (s, z) in zip(x, grids))
        scale = dim**-0.5
        peak = attention_probs(q[..., :256, :], k, None, scale).amax()  # the first 256 queries
        probs = (peak / 255, torch.tensor(0.0), "uniform", 0, 255, -1)
        reference = attention_reference(q, k, v, None, scale, *probs, False)
        forms = {
            "reference arithmetic, whole, inductor": lambda: reference_compiled(q, k, v, None, scale, *probs, False),
            f"reference arithmetic in query tiles ({TILE_SCORES:,} scores)": lambda: tiled_attention(q, k, v, None, scale, *probs, False, -1, TILE_SCORES),
            "SDPA float32 (unquantized probabilities)": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
            "SDPA bf16 (unquantized probabilities)": lambda: F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=scale),
        }
        if has_bf16_brgemm():
            forms["lowbit integer kernel"] = lambda: integer_attention(*x, *grids[0], *grids[1], *grids[2], [0, 255] * 3, scale, *probs[:-1],
                                                                       -1, -1).transpose(1, 2)
        times = {form: median_ms(fn, args.rounds) for form, fn in forms.items()}
        bf16 = times["SDPA bf16 (unquantized probabilities)"]
        for form, fn in forms.items():
            out = fn().float()
            error = ((out - reference).norm() / reference.norm()).item()
            lines.append(f"| {name} | {form} | {times[form]:.2f} | {bf16 / times[form]:.2f}x | {error:.1e} |")
            print(lines[-1], flush=True)
    note = [] if has_bf16_brgemm() else ["The integer kernel does not run on this host (it needs AVX512 and ATen's bf16 brgemm).", ""]
    write_results(args.out, "bench/attention_cpu.py", load_at_start, ["### one attention call, median of the rounds", ""] + lines + [""] + note)


if __name__ == "__main__":
    main()
