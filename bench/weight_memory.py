"""Bytes of quantized weights a compiled model holds, W8A8 against W4A8, on the CPU and Triton targets.

What is counted: every integer weight of a quantized layer as the model stores it (``qvalues``: int8,
or 4-bit packed two per byte) plus every copy of it a compile target made and keeps (oneDNN's
prepacked int8 weights and the int4 kernel's blocks on the CPU; the Triton kernels' prepared
layouts where they are not the stored tensor itself), after one compiled step. Float tensors
(norms, biases, layers left in float) are listed apart. Models: the PixArt-alpha-shaped block and
the SD-1.x down block of ``bench/compile_cpu.py`` (16 image tokens, an 8 x 8 latent: weights do not
depend on them, and the Triton target runs in its interpreter here).

    .venv/bin/python bench/weight_memory.py     # writes bench/results/weight_memory.md
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton target's kernels on CPU tensors, where no GPU is

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compile_cpu import CALIBRATION_TIMESTEPS, pixart_block, sd_down_block  # noqa: E402

import lowbit  # noqa: E402
from lowbit.lowering import int4_linear, onednn, triton as triton_target  # noqa: E402
from lowbit.lowering.native import has_int8_brgemm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "weight_memory.md"
RECIPES = ("minmax-w8a8", "minmax-w4a8")


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _target_copies(weights: dict[int, torch.Tensor]) -> int:
    """Bytes of the copies of ``weights`` (by id) that the compile targets keep (a view of one counts nothing)."""
    held = 0
    for key, packed in onednn._PACKED.items():
        held += _bytes(packed.weight) if id(key) in weights else 0
    for key, kernel in int4_linear._KERNEL_WEIGHTS.items():
        held += _bytes(kernel.blocks) + _bytes(kernel.sums) if id(key) in weights else 0
    for key, prepared in triton_target._PREPARED.items():
        if id(key) in weights:
            held += _bytes(prepared.sum) + (0 if prepared.data.data_ptr() == key.data_ptr() else _bytes(prepared.data))
    return held


def held(model: torch.nn.Module, inputs: dict, target: str) -> list[tuple[str, int, int, int]]:
    """(recipe, integer weights stored, their copies held by the target, float tensors) in bytes."""
    rows = []
    calibration = [((), inputs(torch.Generator().manual_seed(0), t)) for t in CALIBRATION_TIMESTEPS]
    for recipe in RECIPES:
        torch._dynamo.reset()
        qmodel = lowbit.quantize(model, recipe, calibration, progress=False)
        with torch.no_grad():
            torch.compile(qmodel, backend="lowbit", options={"target": target})(**calibration[1][1])
        weights = {id(p.qvalues): p.qvalues for p in qmodel.params.values() if p.qvalues is not None}
        tensors = {id(t): t for t in [*qmodel.graph_module.parameters(), *qmodel.graph_module.buffers()]}
        floats = sum(_bytes(t) for i, t in tensors.items() if i not in weights and t.is_floating_point())
        rows.append((recipe, sum(map(_bytes, weights.values())), _target_copies(weights), floats))
    return rows


def main() -> None:
    models = {"PixArt-alpha block": pixart_block(16), "SD-1.x down block": sd_down_block(8)}
    lines = [f"torch {torch.__version__}; int4 CPU kernel {'runs' if has_int8_brgemm() else 'does not run'} on this host; "
             "the Triton target in its interpreter on CPU tensors (TRITON_INTERPRET=1).", "",
             "| model | target | recipe | integer weights stored (MiB) | copies the target holds (MiB) | integer weights held "
             "(MiB) | vs W8A8 | float tensors (MiB) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, (model, inputs) in models.items():
        for target in ("cpu", "triton"):
            rows = held(model, inputs, target)
            base = rows[0][1] + rows[0][2]
            for recipe, stored, copies, floats in rows:
                mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
                lines.append(f"| {name} | {target} | {recipe} | {mib(stored)} | {mib(copies)} | {mib(stored + copies)} | "
                             f"{(stored + copies) / base:.2f}x | {mib(floats)} |")
                print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
