"""MDWA's block-sparse forms: the BlockMask holds exactly the tiles the windows touch, and FlexAttention and
lowbit's C++ kernel compute what SDPA computes under the windows' boolean mask (band and 2-D windows,
ragged sizes, CFG sharing, a step with no windows)."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.ir.attention_window_statistics import window_keep
from lowbit.lowering import windowed_attention as windowed
from lowbit.lowering.native import native_built

QUERIES, TILE = 36, 16  # not a multiple of the tile: padded rows and columns are guarded
PARTS = {"band": torch.tensor([4, 16, 80]), "grid": torch.tensor([[2, 2], [4, 4], [6, 6]])}  # token counts or grids
KEYS = {"band": 100, "grid": 56}


def widths(heads: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randint(1, 4, (heads, 3))
    w[:, 0] = -1
    w[1, 2] = -1  # one head keeps a whole part
    return w


@pytest.mark.parametrize("geometry", ["band", "grid"])
@pytest.mark.parametrize("past", [0, 9])  # key columns past the parts are kept whole
@pytest.mark.parametrize("tile", [TILE, 3])  # small tiles: every window edge decides a tile
def test_block_mask_holds_exactly_the_tiles_the_windows_touch(geometry, past, tile):
    keys = KEYS[geometry] + past
    keep = window_keep(QUERIES, keys, widths(), PARTS[geometry])
    rows, cols = -(-QUERIES // tile), -(-keys // tile)
    count = lambda m: F.pad(m, (0, cols * tile - keys, 0, rows * tile - QUERIES)).reshape(3, rows, tile, cols, tile).sum((2, 4))
    kept, valid = count(keep.int()), count(torch.ones_like(keep, dtype=torch.int))
    mask = windowed.window_block_mask(widths(), PARTS[geometry], QUERIES, keys, tile)
    full = torch.zeros_like(kept, dtype=torch.bool)
    for h in range(3):
        for r in range(rows):
            full[h, r, mask.full_kv_indices[0, h, r, : mask.full_kv_num_blocks[0, h, r]].long()] = True
    assert torch.equal(mask.to_dense()[0].bool(), kept > 0) and torch.equal(full, kept == valid)
    assert 0 < int(full.sum()) and (tile == TILE or int((kept > 0).sum()) < 3 * rows * cols)  # small tiles: some skipped


@pytest.mark.parametrize("geometry, shared_half", [("band", -1), ("band", 0), ("grid", -1)])
def test_the_op_computes_sdpa_under_the_windows(geometry, shared_half):
    torch.manual_seed(1)
    keys, parts = KEYS[geometry], PARTS[geometry]
    q, k, v = torch.randn(2, 3, QUERIES, 16), torch.randn(2, 3, keys, 16), torch.randn(2, 3, keys, 16)
    got = torch.ops.lowbit_windows.windowed_attention(q, k, v, 0.3, widths(), parts, shared_half, TILE)
    keep = window_keep(QUERIES, keys, widths(), parts)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    if shared_half == 0:
        want = torch.cat([want[:1], want[:1]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


needs_native = pytest.mark.skipif(not native_built(), reason="lowbit's C++ kernels build on AVX512 hosts only")


@pytest.mark.parametrize("form", [windowed.flex_windowed, pytest.param(windowed.native_windowed, marks=needs_native)],
                         ids=["flex", "native"])
@pytest.mark.parametrize("geometry", ["band", "grid"])
@pytest.mark.parametrize("past", [0, 9])
@pytest.mark.parametrize("tile", [TILE, 3])
def test_both_block_sparse_forms_compute_sdpa_under_the_windows(form, geometry, past, tile):
    """Every tile kind (skipped, edge, inside), ragged last tiles, key columns past the parts, and
    operands in the (batch, tokens, heads, dim) layout a projection writes (strided rows)."""
    torch.manual_seed(3)
    keys, parts = KEYS[geometry] + past, PARTS[geometry]
    q, k, v = (torch.randn(2, n, 3, 16).transpose(1, 2) for n in (QUERIES, keys, keys))
    keep = window_keep(QUERIES, keys, widths(), parts)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(form(q, k, v, 0.3, widths(), parts, tile), want, rtol=1e-5, atol=1e-5)


def test_a_step_with_every_part_whole_is_dense_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16)
    got = torch.ops.lowbit_windows.windowed_attention(q, k, v, 0.25, torch.full((3, 2), -1), torch.tensor([1, 4]), -1, TILE)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.25))
