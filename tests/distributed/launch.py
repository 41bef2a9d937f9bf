"""Launching test workers as users do: ``torchrun`` on this machine, two processes, one thread each."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <args>`` from the repository root, output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
