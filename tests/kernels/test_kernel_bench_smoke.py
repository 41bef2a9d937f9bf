"""bench/kernels_gpu.py runs end to end (--smoke: tiny shapes under the interpreter, in a fresh process
so that it sets TRITON_INTERPRET itself) and refuses a real run without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernels_gpu.py"


def test_smoke_run_writes_every_kernel_row(tmp_path):
    out = tmp_path / "kernels.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 32 ")]
    errors = {cells[3].strip(): cells[8].strip() for cells in rows}
    assert len(errors) == 7 and errors["torch._int_mm (int32 out, no epilogue)"] == "-"
    # 8-bit paths stay within ~1% of the float32 product on Gaussian data; int4 weights within ~10%
    for kernel, error in errors.items():
        if error != "-":
            assert float(error) < (0.15 if "W4A8" in kernel else 0.02), (kernel, error)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_refuses_to_time_without_a_gpu():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no CUDA device" in run.stderr
