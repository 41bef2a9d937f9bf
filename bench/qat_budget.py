"""Where a QAT step budget goes: the distillation error after training, by schedule, length and learning-rate decay.

Trains the reference model at W3A8 with plain QAT and FraQAT for 200 steps (constant learning rate
and cosine decay) and plain QAT for as many steps as FraQAT spends at the final bit-width out of
200 (112), and reports each model's distillation loss (``train_quantized.distillation_loss``) averaged
over the 25 training batches. Seed 0, one thread. Writes ``bench/results/qat/budget-w3a8.md``.

`.venv/bin/python bench/qat_budget.py`
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.core.quantize import quantize
from lowbit.evaluation.run import calibrate_reference
from lowbit.ir.bit_schedule import FRAQAT_SCHEDULE, BitSchedule
from lowbit.models.reference import load_reference_model
from lowbit.passes.train_quantized import distillation_loss
from lowbit.recipes import get_recipe

RESULTS = Path(__file__).parent / "results" / "qat" / "budget-w3a8.md"
AT_FINAL = 200 - BitSchedule(FRAQAT_SCHEDULE, 200).starts()[-1]
RUNS = (("qat", 200, "constant"), ("fraqat", 200, "constant"), ("qat", AT_FINAL, "constant"), ("qat", 200, "cosine"),
        ("fraqat", 200, "cosine"))


def main() -> None:
    torch.set_num_threads(1)
    model = load_reference_model()
    calibration = calibrate_reference(model, 16, progress=False)
    lines = [f"Reference model, W3A8, seed 0, lr 3e-5; FraQAT spends {AT_FINAL} of 200 steps at 3 bits. "
             f"Distillation loss over the 25 training batches after training (lower is better).", "",
             "| recipe | steps | learning rate | loss |", "|---|---:|---|---:|"]
    for method, steps, decay in RUNS:
        recipe = get_recipe(f"{method}-w3a8")
        trained = quantize(model, recipe.with_settings("train_quantized", qat_steps=steps, lr_decay=decay), calibration,
                           progress=False)
        with torch.no_grad():
            loss = sum(float(distillation_loss(trained(**kw), model(**kw))) for _, kw in calibration) / len(calibration)
        lines.append(f"| {method} | {steps} | {decay} | {loss:.3g} |")
        print(lines[-1], flush=True)
    lines.append(f"\nLoad average {os.getloadavg()[0]:.1f} at the end.")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
