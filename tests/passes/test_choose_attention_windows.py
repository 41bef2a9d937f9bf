"""MDWA's windows: the band and grid geometries, the streamed mass statistic and the search over it."""

import math

import pytest
import torch

from lowbit.ir.attention_window_statistics import WindowMass, key_parts, part_grids, window_keep, window_kept, window_tiles
from lowbit.ir.attention_windows import AttentionWindows
from lowbit.ir.ops import attention_reference


def keep_by_hand(queries: int, lengths: list[int], widths: list[int]) -> torch.Tensor:
    """LiteVAR's band |i·n_p/n_q − jj| < w per part, in floating point, for one head."""
    keep = torch.zeros(queries, sum(lengths), dtype=torch.bool)
    start = 0
    for n, w in zip(lengths, widths):
        for i in range(queries):
            for jj in range(n):
                keep[i, start + jj] = w < 0 or abs(i * n / queries - jj) < w
        start += n
    return keep


@pytest.mark.parametrize("queries, lengths", [(16, [1, 4, 9, 16]), (9, [1, 4, 9]), (25, [1, 4, 9, 16, 25]), (7, [12])])
def test_window_keep_is_the_band_on_flattened_indices(queries, lengths):
    g = torch.Generator().manual_seed(queries)
    widths = torch.randint(-1, 8, (3, len(lengths)), generator=g)
    got = window_keep(queries, sum(lengths), widths, torch.tensor(lengths))
    for h in range(3):
        assert torch.equal(got[h], keep_by_hand(queries, lengths, widths[h].tolist())), (h, widths[h])
    # the closed forms that never build the mask (a 2K step's mask has 7e8 entries per head) agree with it
    assert torch.equal(window_kept(queries, sum(lengths) + 2, widths, torch.tensor(lengths)),
                       window_keep(queries, sum(lengths) + 2, widths, torch.tensor(lengths)).sum((1, 2)))
    touched, full = window_tiles(queries, sum(lengths), widths, torch.tensor(lengths), 1)
    assert torch.equal(touched, got) and torch.equal(full, got)


def grid_keep_by_hand(query_side: int, sides: list[int], widths: list[int]) -> torch.Tensor:
    """2-D windows for one head: key (r, c) of an s × s part kept when max(|qr·s/S − r|, |qc·s/S − c|) < w
    for the query at (qr, qc) of the S × S query grid, in floating point."""
    keep = torch.zeros(query_side**2, sum(s * s for s in sides), dtype=torch.bool)
    start = 0
    for s, w in zip(sides, widths):
        for i in range(query_side**2):
            qr, qc = divmod(i, query_side)
            for jj in range(s * s):
                r, c = divmod(jj, s)
                far = max(abs(qr * s / query_side - r), abs(qc * s / query_side - c))
                keep[i, start + jj] = w < 0 or far < w
        start += s * s
    return keep


@pytest.mark.parametrize("sides", [(1, 2, 4), (1, 2, 3, 5), (6,)])
def test_grid_windows_are_squares_around_the_query_in_each_scale(sides):
    g = torch.Generator().manual_seed(len(sides))
    widths = torch.randint(-1, 4, (3, len(sides)), generator=g)
    grids = torch.tensor(part_grids(tuple(s * s for s in sides), "grid", sides[-1] ** 2))
    queries, keys = sides[-1] ** 2, sum(s * s for s in sides)
    got = window_keep(queries, keys, widths, grids)
    for h in range(3):
        assert torch.equal(got[h], grid_keep_by_hand(sides[-1], list(sides), widths[h].tolist())), (h, widths[h])
    assert torch.equal(window_kept(queries, keys + 3, widths, grids), window_keep(queries, keys + 3, widths, grids).sum((1, 2)))
    touched, full = window_tiles(queries, keys, widths, grids, 1)
    assert torch.equal(touched, got) and torch.equal(full, got)


def test_grid_geometry_leaves_non_square_parts_and_text_keys_one_row():
    assert part_grids((1, 4, 12), "grid", 12) == ((1, 1), (2, 2), (1, 12))
    assert part_grids((4, 9), "band", 9) == ((1, 4), (1, 9))
    assert part_grids((64,), "grid", 64) == ((8, 8),)  # self-attention over an 8 x 8 image
    assert part_grids((16,), "grid", 64) == ((1, 16),)  # cross-attention to 16 text tokens
    with pytest.raises(ValueError, match="geometry"):
        part_grids((4,), "disc", 4)


def test_zero_padded_parts_and_columns_past_them():
    # a step with fewer parts than the table holds: trailing zero-length parts change nothing
    widths = torch.tensor([[2, 3, 5, 7]])
    padded = window_keep(9, 14, widths, torch.tensor([1, 4, 9, 0]))
    assert torch.equal(padded, window_keep(9, 14, widths[:, :3], torch.tensor([1, 4, 9])))
    assert window_keep(4, 6, torch.tensor([[1]]), torch.tensor([4]))[0, :, 4:].all()  # past the parts: kept


def test_key_parts_follow_the_step_tokens():
    assert key_parts(9, 14, (1, 4, 9, 16)) == (1, 4, 9)
    assert key_parts(16, 30, (1, 4, 9, 16)) == (1, 4, 9, 16)
    assert key_parts(16, 16, (1, 4, 9, 16)) == (16,)  # not a cached step of that layout: one part
    assert key_parts(5, 3, None) == (3,)


def banded_probs(batch: int, heads: int, queries: int, lengths: tuple[int, ...], band: int, leak: float,
                 seed: int = 0) -> torch.Tensor:
    """Probabilities with 1 - ``leak`` of every part's mass inside the band bucket < ``band``."""
    g = torch.Generator().manual_seed(seed)
    inside = window_keep(queries, sum(lengths), torch.full((heads, len(lengths)), band), torch.tensor(lengths))
    noise = torch.rand(batch, heads, queries, sum(lengths), generator=g) + 0.1
    probs = torch.zeros_like(noise)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        mask = inside[:, :, part].float()
        inner = noise[..., part] * mask
        outer = noise[..., part] * (1 - mask)
        probs[..., part] = (1 - leak) * inner / inner.sum((-2, -1), keepdim=True) + \
            leak * outer / outer.sum((-2, -1), keepdim=True).clamp_min(1e-12)
        start += n
    return probs


def test_the_search_finds_a_planted_band_and_keeps_full_parts():
    lengths = (1, 4, 9, 16)
    probs = banded_probs(2, 3, 16, lengths, band=3, leak=0.02)
    mass = WindowMass.of(probs, lengths)
    windows = AttentionWindows.decide({"attn": {3.0: mass}}, ratio=0.95, full_parts=2)
    widths = windows.widths[0, 0]
    assert widths[:, :2].eq(-1).all()  # parts of the first two scales stay whole
    assert widths[:, 3].eq(3).all()  # the planted band (bucket < 3) holds 98% of the mass, a narrower one less than 95%
    assert windows.saved() > 0
    whole = AttentionWindows.decide({"attn": {3.0: mass}}, ratio=1.0, full_parts=0)
    assert whole.widths.eq(-1).all() and whole.saved() == 0.0
    narrow = AttentionWindows.decide({"attn": {3.0: mass}}, ratio=0.5, full_parts=0)
    assert (narrow.widths[0, 0, :, 3] <= 3).all() and narrow.saved() > windows.saved()


def test_grid_windows_find_2d_local_attention_with_fewer_entries_than_bands():
    """Self-attention over a 16 x 16 image with 98% of each row's mass in its 3 x 3 neighbourhood: a band on
    flattened indices must reach the rows above and below (width 17), a 2-D window needs width 2."""
    g = torch.Generator().manual_seed(0)
    near = window_keep(256, 256, torch.full((2, 1), 2), torch.tensor([[16, 16]]))
    noise = torch.rand(1, 2, 256, 256, generator=g) + 0.1
    inner, outer = noise * near, noise * ~near
    probs = 0.98 * inner / inner.sum(-1, keepdim=True) + 0.02 * outer / outer.sum(-1, keepdim=True)
    chosen = {geometry: AttentionWindows.decide({"attn": {0.0: WindowMass.of(probs, None, geometry)}}, 0.95, 0)
              for geometry in ("band", "grid")}
    assert chosen["grid"].widths.eq(2).all() and chosen["grid"].lengths[0, 0].tolist() == [[16, 16]]
    assert chosen["band"].widths.ge(17).all()
    kept = {geometry: windows.entries()[0].sum() for geometry, windows in chosen.items()}
    assert kept["grid"] * 3 < kept["band"]


def test_block_savings_never_exceed_element_savings():
    probs = banded_probs(1, 2, 16, (1, 4, 9, 16), band=2, leak=0.01)
    windows = AttentionWindows.decide({"attn": {3.0: WindowMass.of(probs, (1, 4, 9, 16))}}, ratio=0.9, full_parts=1)
    element = windows.saved()
    assert 0 < element and windows.saved(4) <= element and windows.saved(1) == pytest.approx(element)


def test_statistics_memory_does_not_grow_with_samples():
    lengths = (1, 4, 9)
    first = banded_probs(2, 2, 9, lengths, 2, 0.1, seed=0)
    one = many = WindowMass.of(first, lengths)
    fed = float(first.double().sum())
    for seed in range(1, 40):
        probs = banded_probs(2, 2, 9, lengths, 2, 0.1, seed=seed)
        many, fed = many.merge(WindowMass.of(probs, lengths)), fed + float(probs.double().sum())
    assert many.nbytes() == one.nbytes() and many.rows == 40 * one.rows
    assert math.isclose(float(many.mass.sum()), fed, rel_tol=1e-9)  # every probability landed in one bucket


def test_whole_windows_compute_dense_attention_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (16, 30, 30))
    dense = attention_reference(q, k, v, None, 0.3, None, None, "none", 0, 0, -1, False)
    whole = attention_reference(q, k, v, None, 0.3, None, None, "none", 0, 0, -1, False,
                                torch.full((3, 4), -1), torch.tensor([1, 4, 9, 16]))
    assert torch.equal(dense, whole)
    windowed = attention_reference(q, k, v, None, 0.3, None, None, "none", 0, 0, -1, False,
                                   torch.tensor([[-1, -1, 2, 3]] * 3), torch.tensor([1, 4, 9, 16]))
    keep = window_keep(16, 30, torch.tensor([[-1, -1, 2, 3]] * 3), torch.tensor([1, 4, 9, 16]))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(windowed, expected, rtol=1e-5, atol=1e-6)  # SDPA sums in another order
