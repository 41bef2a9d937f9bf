from lowbit.evaluation.representativeness import markdown, measure


def test_measure_finds_minilm_outlier_channels_and_start_token_stats():
    linear, attention = measure(n_prompts=2, steps=2)
    caption = linear["caption_projection.linear_1"]  # raw MiniLM states enter here
    assert caption["channels"] == 384
    assert 99 in caption["top_channels"] or 62 in caption["top_channels"]  # MiniLM's outlier channels
    assert len(attention) == 6  # one cross-attention per block
    assert all(0.0 < a["start_token_prob"] < 1.0 and 0.0 < a["uniform"] <= 0.5 for a in attention.values())
    assert "| `caption_projection.linear_1` | 384 |" in markdown(linear, attention)
