"""Does MDWA's saving become time? Attention of one VAR step with windows, as FlexAttention's
block-sparse kernel computes it, against dense SDPA (with the same boolean mask, and without any
mask), all under ``torch.compile`` on the CPU, side by side in one process.

Two VAR last-scale steps: VAR-d16 at 256² px (patch_nums 1..16: 256 queries over 680 cached keys)
and a VAR at 1024² px with Infinity's scale schedule (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64:
4,096 queries over 10,521 keys). No trained weights of either exist here, so the windows are
LiteVAR's bands — the first three key parts whole, every later part a band |i·n_p/n_q − j| < w with
w a fixed fraction of the part — at the fraction that skips ``--saved`` of the entries (LiteVAR
Table 1: 70% at R0 = 0.95, 81% at 0.6). The BlockMask is built once per step outside the timed
call (the windows are constants of a step), from lowbit's own mask (``window_keep``); its
``mask_mod`` reads that mask, guarding padded indices. Compiled with ``dynamic=False``: torch 2.13's
CPU FlexAttention template miscompiles some dynamic-shape graphs and crashes when inductor fuses a
pointwise consumer into it (measured here; see the README).

    .venv/bin/python bench/windowed_attention.py --saved 0.7 0.81 --block 16 32 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lowbit.ir.attention_window_statistics import window_keep

RESULTS = Path(__file__).parent / "results" / "windowed_attention.md"
STEPS = {"VAR-d16 256px (256 x 680)": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
         "VAR 1024px (4096 x 10521)": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)}
HEADS, HEAD_DIM, FULL_PARTS = 16, 64, 3


def band_keep(patch_nums: tuple[int, ...], saved: float) -> torch.Tensor:
    """(heads, queries, keys) LiteVAR bands on the last scale skipping about ``saved`` of the entries."""
    lengths = torch.tensor([p * p for p in patch_nums])
    queries, keys = int(lengths[-1]), int(lengths.sum())

    def keep(fraction: float) -> torch.Tensor:
        widths = (lengths.double() * fraction).ceil().clamp_min(1).long()
        widths[:FULL_PARTS] = -1
        return window_keep(queries, keys, widths.expand(HEADS, -1), lengths)

    lo, hi = 0.0, 1.0
    for _ in range(30):  # bisect the band's width fraction
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - keep(mid).double().mean() > saved else (lo, mid)
    return keep(hi)


def block_mask(keep: torch.Tensor, block: int) -> BlockMask:
    """The BlockMask of ``keep``: empty tiles skipped, full tiles unmasked, partial tiles read ``keep``."""
    heads, nq, nk = keep.shape
    rows, cols = -(-nq // block), -(-nk // block)
    padded = F.pad(keep, (0, cols * block - nk, 0, rows * block - nq))
    count = padded.reshape(heads, rows, block, cols, block).sum((2, 4))
    valid = F.pad(torch.ones(nq, nk), (0, cols * block - nk, 0, rows * block - nq)).reshape(rows, block, cols, block).sum((1, 3))
    full, partial = count == valid, (count > 0) & (count < valid)

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tiles[None].int()
        return t.sum(-1).int(), torch.argsort(t, dim=-1, descending=True, stable=True).int()

    def mask_mod(b, h, q, k):
        return (q < nq) & (k < nk) & keep[h, q.clamp(max=nq - 1), k.clamp(max=nk - 1)]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(nq, nk))


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median time of each function, interleaved round by round after one warm-up call each."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saved", type=float, nargs="+", default=[0.7, 0.81])
    parser.add_argument("--block", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=2, help="a CFG pair")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"Host: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average at start {os.getloadavg()[0]:.2f}. Times: median of {args.rounds} interleaved calls (ms).", "",
             "| step | entries skipped | tiles skipped | SDPA, no mask | SDPA, boolean mask | FlexAttention "
             "| flex vs SDPA no mask | flex vs SDPA masked |", "|---|---|---|---|---|---|---|---|"]
    dense = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dynamic=False)
    for step, patch_nums in STEPS.items():
        nq, nk = patch_nums[-1] ** 2, sum(p * p for p in patch_nums)
        q = torch.randn(args.batch, HEADS, nq, HEAD_DIM)
        k, v = torch.randn(args.batch, HEADS, nk, HEAD_DIM), torch.randn(args.batch, HEADS, nk, HEAD_DIM)
        for saved in args.saved:
            keep = band_keep(patch_nums, saved)
            flex = {}
            for block in args.block:
                mask = block_mask(keep, block)
                compiled = torch.compile(lambda q, k, v, mask=mask: flex_attention(q, k, v, block_mask=mask), dynamic=False)
                flex[block] = (mask, compiled)
            with torch.no_grad():
                ms = median_ms({"plain": lambda: dense(q, k, v, None), "masked": lambda: dense(q, k, v, keep)}
                               | {block: (lambda f=f: f(q, k, v)) for block, (_, f) in flex.items()}, args.rounds)
                reference = dense(q, k, v, keep)
                for block, (mask, compiled) in flex.items():
                    error = float((compiled(q, k, v) - reference).abs().max())
                    if error > 1e-4:
                        raise AssertionError(f"{step}: FlexAttention with {block}² tiles differs from masked SDPA by {error}")
                    tiles = 1 - (mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) / (mask.kv_num_blocks.numel() * -(-nk // block))
                    lines.append(f"| {step}, {block}² tiles | {1 - keep.double().mean():.1%} | {float(tiles):.1%} | "
                                 f"{ms['plain']:.1f} | {ms['masked']:.1f} | {ms[block]:.1f} | {ms['plain'] / ms[block]:.2f}x | "
                                 f"{ms['masked'] / ms[block]:.2f}x |")
                    print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"Load average at the end {os.getloadavg()[0]:.2f}. FlexAttention agreed with masked SDPA within 1e-4 "
                 f"(max abs) in every row.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
