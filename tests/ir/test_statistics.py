import torch

from lowbit.ir.statistics import ObservationStore, RangeStatistics


def test_per_channel_and_per_token_ranges():
    x = torch.zeros(2, 3, 4)  # (batch, tokens, channels)
    x[1, 2, 3] = 7.0
    x[0, 1, 0] = -2.0
    s = RangeStatistics.of(x, "channels_last")
    assert s.channel_max.tolist() == [0, 0, 0, 7] and s.channel_min.tolist() == [-2, 0, 0, 0]
    assert s.token_max.tolist() == [0, 0, 7] and s.token_min.tolist() == [0, -2, 0]
    conv = RangeStatistics.of(torch.arange(8.0).reshape(1, 2, 2, 2), "channels_first")
    assert conv.channel_max.tolist() == [3, 7] and conv.token_max.tolist() == [4, 5, 6, 7]


def test_merge_is_exact_and_order_free():
    torch.manual_seed(0)
    chunks = [torch.randn(2, 5, 3) * (i + 1) for i in range(4)]
    one = RangeStatistics.of(torch.cat(chunks), "channels_last")
    a, b = ObservationStore(), ObservationStore()
    for i, c in enumerate(chunks):
        (a if i % 2 else b).add("layer:input", 10.0, RangeStatistics.of(c, "channels_last"))
    merged = b.merge(a).stats["layer:input"][10.0]
    for field in ("channel_min", "channel_max", "token_min", "token_max"):
        assert torch.equal(getattr(merged, field), getattr(one, field))
    assert merged.count == one.count


def test_memory_does_not_grow_with_samples():
    store = ObservationStore()
    sizes = []
    for _ in range(50):
        store.add("layer:input", 1.0, RangeStatistics.of(torch.randn(4, 16, 32), "channels_last"))
        sizes.append(store.nbytes())
    assert sizes[0] == sizes[-1] > 0
