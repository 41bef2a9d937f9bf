import torch

from lowbit.models import digits


def test_split_shapes_range_and_balance():
    x, y = digits.load_split("train")
    xh, yh = digits.load_split("heldout")
    assert x.shape[1:] == (1, 16, 16) and xh.shape[1:] == (1, 16, 16)
    assert len(x) + len(xh) == 1797
    assert x.min() >= -1.0 and x.max() <= 1.0
    # stratified 80/20: every class is in both splits, held-out share 20% +- 1 image per class
    counts, counts_h = torch.bincount(y, minlength=10), torch.bincount(yh, minlength=10)
    assert ((counts_h.float() / (counts + counts_h) - 0.2).abs() < 0.01).all()


def test_split_is_fixed():
    a, _ = digits.load_split("heldout")
    digits._split.cache_clear()
    b, _ = digits.load_split("heldout")
    assert torch.equal(a, b)


def test_prompts_name_the_class_and_heldout_phrasings_are_unseen():
    for c in range(10):
        seen, held = digits.prompts_for(c, "seen"), digits.prompts_for(c, "heldout")
        assert len(seen) + len(held) >= 6
        assert all(digits.NAMES[c] in p or str(c) in p for p in seen + held)
        assert not set(seen) & set(held)
