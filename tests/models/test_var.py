"""The project's VAR: the cached per-scale forward equals the block-causal full forward, sampling
is reproducible, the tokenizer's inputs match what sampling feeds, and the shipped model works."""

import pytest
import torch

from lowbit.models.var import PROTOCOL, VARConfig, VARStep, load_tokenizer, load_var, sample
from lowbit.models.var.sampling import sample_tokens
from tests.conftest import small_var


def test_kv_cached_steps_give_the_full_forward_logits():
    var, tokenizer, step = small_var()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    indices = tokenizer.encode(images)
    teacher = tokenizer.teacher_inputs(indices)
    labels = torch.tensor([4, 7, var.null_class])
    full = var(labels, teacher)
    keys, values = step.empty_cache(3)
    hidden, cond = var.embed(labels, None, scale=0)
    per_scale = []
    for si, where in enumerate(var.config.scale_slices()):
        out = step(hidden=hidden, cond=cond, scale=torch.full((3,), float(si)), past_keys=keys, past_values=values)
        per_scale.append(out[0])
        keys, values = out[1:3], out[3:5]
        assert keys[0].shape[2] == where.stop  # the cache holds every token so far, and only those
        if si + 1 < var.config.scales:
            nxt = var.config.scale_slices()[si + 1]
            hidden, _ = var.embed(labels, teacher[:, nxt.start - 1 : nxt.stop - 1], scale=si + 1)
    # the same arithmetic in another order (masked softmax over all keys vs softmax over the prefix)
    torch.testing.assert_close(torch.cat(per_scale, 1), full, rtol=1e-4, atol=1e-5)


def test_sampling_is_reproducible_and_per_image():
    var, tokenizer, step = small_var()
    labels = torch.tensor([1, 2, 3])
    a = sample(step, var, tokenizer, labels, [10, 11, 12])
    b = sample(step, var, tokenizer, labels, [10, 11, 12])
    alone = sample(step, var, tokenizer, labels[1:2], [11])
    other = sample(step, var, tokenizer, labels, [20, 21, 22])
    assert torch.equal(a, b)
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=1e-5)  # image 1 depends on its seed, not its batch
    assert not torch.equal(a, other)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]])
    drawn = {int(sample_tokens(logits, [torch.Generator().manual_seed(s)], top_k=2, top_p=1.0)) for s in range(200)}
    assert drawn == {0, 1}
    # softmax mass of the top token is 0.64, of the top two 0.88: top_p 0.8 keeps exactly those two
    drawn = {int(sample_tokens(logits, [torch.Generator().manual_seed(s)], top_k=0, top_p=0.8)) for s in range(200)}
    assert drawn == {0, 1}


def test_trace_records_one_call_per_scale_with_growing_cache():
    var, tokenizer, step = small_var()
    trace = []
    sample(step, var, tokenizer, torch.tensor([5, 6]), [1, 2], trace=trace)
    assert [kw["hidden"].shape[1] for kw in trace] == [1, 4, 16]
    assert [kw["past_keys"][0].shape[2] for kw in trace] == [0, 1, 5]
    assert all(kw["hidden"].shape[0] == 4 for kw in trace)  # CFG: [class; null]
    assert [kw["scale"][0].item() for kw in trace] == [0.0, 1.0, 2.0]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        VARConfig(width=50, heads=4)
    with pytest.raises(ValueError, match="start at 1"):
        VARConfig(patch_nums=(2, 3))


def test_shipped_var_draws_the_requested_digits():
    from lowbit.evaluation.harness import evaluate
    from lowbit.models.var import make_sampler

    var, tokenizer = load_var(), load_tokenizer()
    result = evaluate(make_sampler(VARStep(var), var, tokenizer), 50, seed=3, n_heldout=10)
    # done-criterion 1 of the VAR issue at the pinned protocol: >= 90% (README: measured on 1000)
    assert result.alignment_seen >= 0.9, (result.alignment_seen, PROTOCOL)
