"""Does MDWA's saving become time? Attention of one VAR step with windows, in the two block-sparse forms
of lowbit's ``lowbit_windows::windowed_attention`` — FlexAttention's kernel with the BlockMask of the
windows (compiled per shape), and lowbit's C++ kernel (on AVX512 hosts; the op's choice there) —
against dense SDPA (with the same boolean mask, and without any mask) under ``torch.compile`` on the
CPU, side by side in one process.

Three VAR last-scale steps: VAR-d16 at 256² px (patch_nums 1..16: 256 queries over 680 cached keys),
a VAR at 1024² px with Infinity's scale schedule (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64:
4,096 queries over 10,521 keys) and at 2048² px (that schedule continued by 80, 96, 128 — an
assumption, no 2K VAR ships a schedule here: 16,384 queries over 42,521 keys). No trained weights
of these exist here, so the windows are LiteVAR's bands — the first three key parts whole, every
later part a band |i·n_p/n_q − j| < w with w a fixed fraction of the part — at the fraction that
skips ``--saved`` of the entries (LiteVAR Table 1: 70% at R0 = 0.95, 81% at 0.6). Both forms build their
tables on the first call and keep them (the windows are constants of a step), as in a model. The
boolean mask for SDPA is built only where it fits in memory (not at 2K: 11 GB); every row checks
the first and last 128 query rows against SDPA under the windows' mask.

    .venv/bin/python bench/windowed_attention.py --saved 0.7 0.81 --tile 16 32 64 --rounds 3
    .venv/bin/python bench/windowed_attention.py --decompose "VAR 1024px (4096 x 10521)" 0.7 16 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.ir.attention_window_statistics import window_keep, window_kept, window_tiles
from lowbit.lowering.native import native_built
from lowbit.lowering.windowed_attention import flex_windowed, native_tile, native_windowed

RESULTS = Path(__file__).parent / "results" / "windowed_attention.md"
STEPS = {"VAR-d16 256px (256 x 680)": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
         "VAR 1024px (4096 x 10521)": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64),
         "VAR 2048px (16384 x 42521)": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)}
HEADS, HEAD_DIM, FULL_PARTS = 16, 64, 3
MASK_BYTES = 2 << 30  # the largest boolean mask built for masked SDPA
CHECKED_ROWS = 128


def band_widths(lengths: torch.Tensor, saved: float) -> torch.Tensor:
    """(heads, parts) LiteVAR bands on the last scale skipping about ``saved`` of the entries."""
    queries, keys = int(lengths[-1]), int(lengths.sum())

    def widths(fraction: float) -> torch.Tensor:
        w = (lengths.double() * fraction).ceil().clamp_min(1).long()
        w[:FULL_PARTS] = -1
        return w.expand(HEADS, -1)

    lo, hi = 0.0, 1.0
    for _ in range(30):  # bisect the band's width fraction
        mid = (lo + hi) / 2
        skipped = 1 - float(window_kept(queries, keys, widths(mid), lengths).sum()) / (HEADS * queries * keys)
        lo, hi = (mid, hi) if skipped > saved else (lo, mid)
    return widths(hi)


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


def checked_error(out: torch.Tensor, q, k, v, widths, lengths) -> float:
    """Max |out − SDPA under the windows' mask| over the first and last query rows."""
    nq, nk = q.shape[-2], k.shape[-2]
    rows = torch.cat([torch.arange(CHECKED_ROWS), torch.arange(nq - CHECKED_ROWS, nq)]).unique()
    keep = window_keep(nq, nk, widths, lengths, rows)
    want = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=keep, scale=HEAD_DIM**-0.5)
    return float((out[:, :, rows] - want).abs().max())


def decompose(step: str, saved: float, tile: int, batch: int, rounds: int) -> list[str]:
    """Where FlexAttention's time goes, side by side: computing every tile (its efficiency against SDPA's),
    only the windows' tiles with no mask function (what skipping tiles alone gives), and the windows'
    tiles with the edge tiles masked (lowbit's FlexAttention form)."""
    from lowbit.lowering.windowed_attention import flex_kernel, tile_block_mask

    lengths = torch.tensor([p * p for p in STEPS[step]])
    nq, nk = int(lengths[-1]), int(lengths.sum())
    q = torch.randn(batch, HEADS, nq, HEAD_DIM)
    k, v = torch.randn(batch, HEADS, nk, HEAD_DIM), torch.randn(batch, HEADS, nk, HEAD_DIM)
    widths = band_widths(lengths, saved)
    touched, _ = window_tiles(nq, nk, widths, lengths, tile)
    none = torch.zeros_like(touched)
    every, windows = (tile_block_mask(none, tiles, tile, nq, nk) for tiles in (torch.ones_like(touched), touched))
    dense = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), dynamic=False)
    fns = {"SDPA, no mask": lambda: dense(q, k, v),
           "FlexAttention, every tile": lambda: flex_kernel(q, k, v, every, HEAD_DIM**-0.5),
           "FlexAttention, the windows' tiles, no mask function": lambda: flex_kernel(q, k, v, windows, HEAD_DIM**-0.5),
           "FlexAttention, the windows' tiles, edges masked": lambda: flex_windowed(q, k, v, HEAD_DIM**-0.5, widths, lengths, tile)}
    with torch.no_grad():
        ms = median_ms(fns, rounds)
    lines = [f"Where the time goes: {step}, {saved:.0%} of the entries skipped, {tile}² tiles "
             f"({1 - float(touched.double().mean()):.1%} of them skipped):", "",
             "| form | ms | vs SDPA, no mask |", "|---|---|---|"]
    return lines + [f"| {name} | {t:.1f} | {ms['SDPA, no mask'] / t:.2f}x |" for name, t in ms.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saved", type=float, nargs="+", default=[0.7, 0.81])
    parser.add_argument("--tile", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--batch", type=int, default=2, help="a CFG pair")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--decompose", nargs=3, metavar=("STEP", "SAVED", "TILE"),
                        help="instead, time FlexAttention's parts at one step (a --steps name), saving and tile")
    args = parser.parse_args()
    torch.manual_seed(0)
    host = (f"Host: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
            f"at start {os.getloadavg()[0]:.2f}. Times: median of {args.rounds} interleaved calls (ms).")
    if args.decompose:
        step, saved, tile = args.decompose
        lines = [host, ""] + decompose(step, float(saved), int(tile), args.batch, args.rounds)
        lines.append(f"\nLoad average at the end {os.getloadavg()[0]:.2f}.")
        (args.out.parent / "windowed_attention_decomposed.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    forms = {"FlexAttention": flex_windowed} | ({"lowbit C++": native_windowed} if native_built() else {})
    lines = [host, "" if native_built() else "\nlowbit's C++ kernel does not run on this host (AVX512 only).\n",
             "| step | tiles | entries skipped | tiles skipped | SDPA, no mask | SDPA, boolean mask | "
             + " | ".join(f"{form} | {form} vs SDPA no mask" for form in forms) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(forms)]
    dense = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dynamic=False)
    for step in args.steps:
        lengths = torch.tensor([p * p for p in STEPS[step]])
        nq, nk = int(lengths[-1]), int(lengths.sum())
        q = torch.randn(args.batch, HEADS, nq, HEAD_DIM)
        k, v = torch.randn(args.batch, HEADS, nk, HEAD_DIM), torch.randn(args.batch, HEADS, nk, HEAD_DIM)
        for saved in args.saved:
            widths = band_widths(lengths, saved)
            fns = {"plain": lambda: dense(q, k, v, None)}
            if HEADS * nq * nk <= MASK_BYTES:
                keep = window_keep(nq, nk, widths, lengths)
                fns["masked"] = lambda: dense(q, k, v, keep)
            fns |= {(form, tile): (lambda f=f, t=tile: f(q, k, v, HEAD_DIM**-0.5, widths, lengths, t))
                    for form, f in forms.items() for tile in args.tile}
            with torch.no_grad():
                ms = median_ms(fns, args.rounds)
                skipped = 1 - float(window_kept(nq, nk, widths, lengths).sum()) / (HEADS * nq * nk)
                for tile in args.tile:
                    cells = []
                    for form in forms:
                        error = checked_error(fns[form, tile](), q, k, v, widths, lengths)
                        if error > 1e-4:
                            raise AssertionError(f"{step}: {form} with {tile}² tiles differs from masked SDPA by {error}")
                        chosen = " (the op's)" if form == "lowbit C++" and tile == native_tile(nq) else ""
                        cells += [f"{ms[form, tile]:.1f}{chosen}", f"{ms['plain'] / ms[form, tile]:.2f}x"]
                    touched, _ = window_tiles(nq, nk, widths, lengths, tile)
                    masked = f"{ms['masked']:.1f}" if "masked" in ms else "— (mask too large)"
                    lines.append(f"| {step} | {tile}² | {skipped:.1%} | {1 - float(touched.double().mean()):.1%} | "
                                 f"{ms['plain']:.1f} | {masked} | " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"Load average at the end {os.getloadavg()[0]:.2f}. Every block-sparse form agreed with SDPA under the "
                 f"windows' mask within 1e-4 (max abs, the first and last {CHECKED_ROWS} query rows) in every row.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
