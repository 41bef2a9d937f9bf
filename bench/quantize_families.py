"""Baseline quantization error on every supported diffusers family (small configs, random weights).

For each family and recipe: the relative L2 error of the quantized denoiser's output against
full precision, on a calibration sample at a CFG-sized batch, and the time lowbit.quantize took.
Writes bench/results/quantize_families.md (the table the README shows).

    .venv/bin/python bench/quantize_families.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

import lowbit
from lowbit.models.tiny import TINY_MODELS, build

RECIPES = ("minmax-w8a8", "minmax-w8a6", "minmax-w4a8", "minmax-w4a6")
STEPS = (900.0, 500.0, 100.0)


def calibration(name: str) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in STEPS:
        kw = TINY_MODELS[name].inputs(2, g)
        kw["timestep"] = torch.full((2,), t / 1000 if name == "flux" else t)
        out.append(((), kw))
    return out


def main() -> None:
    lines = ["| family | class | " + " | ".join(RECIPES) + " | quantize time (s) |",
             "| --- | --- | " + " | ".join("---:" for _ in RECIPES) + " | ---: |"]
    for name in TINY_MODELS:
        model = build(name)
        samples = calibration(name)
        test = tree_map(lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v, samples[1][1])
        ref = model(**test, return_dict=False)[0]
        cells, seconds = [], []
        for recipe in RECIPES:
            start = time.perf_counter()
            qmodel = lowbit.quantize(model, recipe, samples, progress=False)
            seconds.append(time.perf_counter() - start)
            out = qmodel(**test, return_dict=False)[0]
            cells.append(f"{((out - ref).norm() / ref.norm()).item():.4f}")
        lines.append(f"| {name} | {type(model).__name__} | " + " | ".join(cells) + f" | {sum(seconds) / len(seconds):.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    path = Path(__file__).parent / "results" / "quantize_families.md"
    path.write_text(f"Relative L2 error of the denoiser output vs full precision (lower is better).\n\n{table}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
