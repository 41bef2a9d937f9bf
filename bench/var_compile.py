"""A whole VAR sampling run (every scale, CFG batch [class; null]) on CPU: FP32 eager, FP32
inductor, bf16 autocast, and lowbit W8A8 / W4A8 (LiteVAR's dynamic per-token activations, QKV at
8 bits) through ``torch.compile(backend="lowbit")`` with int8 GEMMs (torch._int_mm).

Every variant samples the same labels with the same seeds, side by side in one process,
interleaved round by round so that a busy machine slows them alike; the table gives medians and
ratios against FP32 eager. The error column compares the last scale's logits with FP32's on the
same (FP32 run's) inputs, so it measures the arithmetic, not diverging samples. W4A8 stores its
4-bit weights in int8 on this path (packing is future work), so it runs at W8A8's speed.

Shapes: the shipped digits VAR, and VAR-d16 (depth 16, width 1024, 16 heads, patch_nums
1..16 = 680 tokens, 4096 codes of 32 channels; random weights, with a random tokenizer of the
same code shape, whose decoder is small here).

    .venv/bin/python bench/var_compile.py                 # both, writes bench/results/var_compile.md
    .venv/bin/python bench/var_compile.py --models d16 --out bench/results/var_compile_d16.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import lowbit
from compile_cpu import peak_step_bytes, write_results
from lowbit.models.var import VAR, MultiScaleVQ, TokenizerConfig, VARConfig, VARStep, load_tokenizer, load_var, sample

RESULTS = Path(__file__).parent / "results" / "var_compile.md"
D16 = VARConfig(depth=16, width=1024, heads=16, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), vocab_size=4096,
                latent_channels=32, num_classes=1000)


def var_d16() -> tuple[VAR, MultiScaleVQ]:
    torch.manual_seed(0)
    tokenizer = MultiScaleVQ(TokenizerConfig(image_size=64, channels=3, hidden=32, latent_channels=32, vocab_size=4096,
                                             patch_nums=D16.patch_nums)).eval()
    return VAR(D16).eval(), tokenizer


def variants(step: VARStep, calibration: list) -> dict[str, Callable]:
    """name -> a module called like ``step``."""
    out: dict[str, Callable] = {"FP32 eager": step, "FP32 compiled (inductor)": torch.compile(step, dynamic=True)}

    def bf16(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tuple(t.float() for t in step(**kw))

    out["bf16 autocast"] = bf16
    for recipe in ("litevar-w8a8", "litevar-w4a8"):
        qmodel = lowbit.quantize(step, recipe, calibration, step_arg="scale", progress=False)
        out[f"lowbit {recipe.split('-')[1].upper()} (backend=lowbit)"] = torch.compile(qmodel, backend="lowbit", dynamic=True)
    return out


def measure(title: str, var: VAR, tokenizer: MultiScaleVQ, images: int, rounds: int) -> list[str]:
    step = VARStep(var)
    labels, seeds = torch.arange(images) % var.config.num_classes, list(range(images))
    trace: list[dict] = []
    with torch.no_grad():
        sample(step, var, tokenizer, labels, seeds, trace=trace)
    calibration = [((), kw) for kw in trace]
    last = trace[-1]
    runs = variants(step, calibration)
    times: dict[str, list[float]] = {name: [] for name in runs}
    logits: dict[str, torch.Tensor] = {}
    run = lambda fn: sample(fn, var, tokenizer, labels, seeds)  # noqa: E731
    with torch.no_grad():
        for name, fn in runs.items():  # warm-up: compiles (every scale's shape), first allocations
            start = time.perf_counter()
            run(fn)
            logits[name] = fn(**last)[0].float()
            print(f"  {title}: {name} warm-up {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                run(fn)
                times[name].append(time.perf_counter() - start)
        peaks = {name: peak_step_bytes(lambda fn=fn: run(fn)) for name, fn in runs.items()}
    base = statistics.median(times["FP32 eager"])
    reference = logits["FP32 eager"]
    lines = [f"### {title}", "",
             "| variant | ms / sampling run | speed-up vs FP32 eager | vs bf16 autocast | peak run memory (MiB) | rel. L2 error of last-scale logits |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    bf16 = statistics.median(times["bf16 autocast"])
    for name in runs:
        t = statistics.median(times[name])
        err = ((logits[name] - reference).norm() / reference.norm()).item()
        lines.append(f"| {name} | {t * 1e3:.0f} | {base / t:.2f}x | {bf16 / t:.2f}x | {peaks[name] / 2**20:.0f} | {err:.4f} |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shipped", "d16"], choices=["shipped", "d16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    sections = []
    if "shipped" in args.models:
        var = load_var()
        sections += measure(f"shipped digits VAR ({sum(p.numel() for p in var.parameters()) / 1e6:.1f}M parameters), "
                            f"16 images, CFG batch 32", var, load_tokenizer(), images=16, rounds=args.rounds)
    if "d16" in args.models:
        var, tokenizer = var_d16()
        sections += measure(f"VAR-d16 shape ({sum(p.numel() for p in var.parameters()) / 1e6:.0f}M parameters, random), "
                            f"1 image, CFG batch 2", var, tokenizer, images=1, rounds=args.rounds)
    write_results(args.out, "bench/var_compile.py", load_at_start, sections)

if __name__ == "__main__":
    main()
