"""Run by ``torchrun`` from the tests: each process quantizes the reference model on its half of a
saved calibration set and saves what it decided, for the test to compare with one process."""

import argparse
import sys

import torch
import torch.distributed as dist

from lowbit import quantize
from lowbit.models.reference import load_reference_model
from tests.distributed.decisions import decisions


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibration", required=True, help="a torch.save'd list of (args, kwargs)")
    parser.add_argument("--recipe", action="append", required=True)
    parser.add_argument("--out", required=True, help="each process writes <out>/rank<r>.pt")
    parser.add_argument("--empty-shard", type=int, default=None, help="this rank calibrates on nothing")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        samples = torch.load(args.calibration, weights_only=False)
        half = len(samples) // world
        mine = [] if rank == args.empty_shard else samples[rank * half : (rank + 1) * half]
        model = load_reference_model()
        try:
            decided = {r: decisions(quantize(model, r, mine, progress=False)) for r in args.recipe}
        except Exception as err:  # noqa: BLE001 - the test reads what each rank was told
            print(f"rank {rank}: {type(err).__name__}: {err}", file=sys.stderr)
            return 3
        torch.save(decided, f"{args.out}/rank{rank}.pt")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
