from lowbit.evaluation.harness import blob_sampler, evaluate, real_vs_real_fid
from lowbit.models.reference import load_reference_model, make_sampler


def test_evaluate_is_deterministic_and_sensitive_to_seed():
    sampler = make_sampler(load_reference_model(), steps=3)
    a = evaluate(sampler, n_samples=10, seed=0)
    b = evaluate(sampler, n_samples=10, seed=0)
    c = evaluate(sampler, n_samples=10, seed=1)
    assert a.metrics() == b.metrics()
    assert (a.images_seen == b.images_seen).all()
    assert not (a.images_seen == c.images_seen).all()
    assert a.images_seen.shape == a.images_heldout.shape == (10, 1, 16, 16)
    assert sorted(a.labels.tolist()) == list(range(10))  # balanced over the 10 classes


def test_blob_baseline_is_far_above_the_real_floor():
    floor = real_vs_real_fid()
    blobs = evaluate(blob_sampler, n_samples=100, seed=0)
    # blobs carry no digit identity: chance alignment (~10%) and FID many times the floor
    assert blobs.fid > 10 * floor
    assert blobs.alignment_seen < 0.3
