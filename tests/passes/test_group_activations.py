"""K-means group quantization (DGQ eq. 6-7)."""

import numpy as np
import torch
from torch.utils._pytree import tree_map

import lowbit
from lowbit.ir.annotations import QUANT_KEY, LAYER_KEY
from lowbit.ir.capture import capture
from lowbit.ir.observers import observing
from lowbit.ir.precision import Precision
from lowbit.models.tiny import build
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.base import PassContext
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.choose_quant_params import ChooseQuantParams
from lowbit.passes.detect_outlier_dim import DetectOutlierDim
from lowbit.passes.group_activations import GroupActivations, cluster_ranges
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.pipeline import Pipeline
from lowbit.recipes import Recipe
from tests.passes.conftest import tiny_inputs


def _grouped(name: str, w: float, a: float, groups: int, **settings) -> Recipe:
    return Recipe.build(name, w, a).with_pass("detect_outlier_dim").with_pass("group_activations", groups=groups, **settings)


def test_kmeans_separates_planted_ranges():
    torch.manual_seed(0)
    n = 64
    vmax = torch.rand(n) * 0.2 + 1.0
    vmin = -vmax
    planted = {5: 40.0, 17: 45.0, 30: 8.0, 31: 9.0}  # two far outliers, two medium ones
    for i, v in planted.items():
        vmax[i], vmin[i] = v, -v / 4
    labels = cluster_ranges(vmin, vmax, 3)
    assert labels[5] == labels[17] and labels[30] == labels[31]
    assert len({labels[5], labels[30], labels[0]}) == 3
    normal = [i for i in range(n) if i not in planted]
    assert len(set(labels[normal])) == 1
    assert np.array_equal(labels, cluster_ranges(vmin, vmax, 3))  # deterministic seeding


def test_fewer_distinct_ranges_than_groups():
    labels = cluster_ranges(torch.tensor([-1.0, -1.0, -2.0]), torch.tensor([1.0, 1.0, 2.0]), 8)
    assert sorted(set(labels.tolist())) == [0, 1]


def _cfg_batch(sample):
    return tree_map(lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v, sample)


def test_one_group_is_exactly_the_baseline(calib):
    model, samples = build("sd-unet"), calib("sd-unet")
    base = lowbit.quantize(model, Recipe.build("base", 8, 6), samples, progress=False)
    one = lowbit.quantize(model, _grouped("k1", 8, 6, 1), samples, progress=False)
    test = _cfg_batch(samples[2][1])
    assert torch.equal(one(**test)[0], base(**test)[0])
    node = next(n for n in one.graph_module.graph.nodes if QUANT_KEY in n.meta and n.meta[LAYER_KEY].path == "down_blocks.0.resnets.0.conv2")
    assert node.meta[QUANT_KEY].input.granularity == "group" and node.meta[QUANT_KEY].input.num_groups == 1


def test_groups_reduce_error_and_follow_the_timestep(calib, tmp_path):
    model, samples = build("sd-unet"), calib("sd-unet")
    test = _cfg_batch(samples[1][1])
    ref = model(**test, return_dict=False)[0]
    errors = {}
    for k in (1, 4, 16):
        q = lowbit.quantize(model, _grouped(f"g{k}", 8, 6, k), samples, progress=False)
        errors[k] = ((q(**test)[0] - ref).norm() / ref.norm()).item()
    # more groups, less error (measured 0.090 -> 0.062 -> 0.055 on this model)
    assert errors[16] < errors[4] < errors[1]
    spec = q.params["down_blocks.1.resnets.0.conv1:input"].spec
    assert spec.mode == "per_step" and len(spec.groups) == 3  # one assignment per calibrated timestep
    assert q.params["down_blocks.1.resnets.0.conv1:input"].scale.shape[0] == 3
    lowbit.save(q, tmp_path / "g16")
    loaded = lowbit.load(tmp_path / "g16", model)
    assert torch.equal(loaded(**test)[0], q(**test)[0])
    node = next(n for n in loaded.graph_module.graph.nodes if QUANT_KEY in n.meta and n.meta[LAYER_KEY].path == "down_blocks.1.resnets.0.conv1")
    assert node.meta[QUANT_KEY].input == spec


def _group_axes(model, calib, **settings):
    """Grouping axis of every grouped operand, with a K = 4 pipeline run directly (text input `text`)."""
    ctx = PassContext(precision=Precision(8, 8, keep_io_layers=False))
    gm = Pipeline([CanonicalizeAttention(), AnnotateQuantization(), InsertObservers()]).run(
        capture(model, (), calib), ctx)
    with observing(gm, ctx.observations):
        gm(**calib)
    gm = Pipeline([ChooseQuantParams(), DetectOutlierDim(text_input="text"), GroupActivations(4, **settings)]).run(gm, ctx)
    return {t: ("channel" if p.spec.axis == -1 else "token") for t, p in ctx.params.items() if p.spec.granularity == "group"}


def test_text_positions_are_grouped_along_channels_unless_asked(tiny):
    model, _ = tiny
    calib = tiny_inputs()
    calib["text"][:, 2] += 20.0  # a text position far out of range: eq. 5 alone picks the token axis
    plain, ablation = _group_axes(model, calib), _group_axes(model, calib, group_text_tokens=True)
    assert ablation["ck:input"] == ablation["cv:input"] == "token"
    assert plain["ck:input"] == plain["cv:input"] == plain["@1:key"] == plain["@1:value"] == "channel"
    image = [t for t in plain if not t.startswith(("ck:", "cv:", "@1:key", "@1:value"))]
    assert image and all(plain[t] == ablation[t] for t in image)  # image operands keep eq. 5's choice


def test_groups_never_clip_their_own_calibration_data(calib):
    """At 16 bits the grid step is ~1e-5 of the range, so the output on a calibration input matches
    full precision (measured 5e-6) unless some vector falls outside its group's range — which
    happens only if group labels or timestep rows reach the wrong vectors (giving each group its
    neighbour's parameters measured 0.17-0.23). Token groups on every operand (text positions
    included) make the check cover both axes."""
    model, samples = build("pixart"), calib("pixart")
    q = lowbit.quantize(model, _grouped("g16", 16, 16, 16, group_text_tokens=True), samples, progress=False)
    axes = {p.spec.axis for p in q.params.values() if p.spec.granularity == "group"}
    assert axes == {-1, 1}  # both channel and token groups are exercised
    for args, kwargs in samples:
        ref = model(*args, **kwargs, return_dict=False)[0]
        err = ((q(*args, **kwargs)[0] - ref).norm() / ref.norm()).item()
        assert err < 1e-3, err


def test_conditioning_vectors_keep_one_range_when_they_vary_between_prompts(calib):
    """SD3's conditioning vector folds in the pooled text embedding: one token per sample whose channel
    ranges are a few per-prompt values, so it keeps one range per step; the timestep's sinusoid
    feeding the same embedder is one token too but equal across a step's samples, so it keeps its groups."""
    model, samples = build("sd3"), calib("sd3", batch=4)
    q = lowbit.quantize(model, _grouped("g8", 8, 8, 8, select_dim=False), samples, progress=False)
    text = q.params["time_text_embed.text_embedder.linear_1:input"].spec.groups
    timestep = q.params["time_text_embed.timestep_embedder.linear_1:input"].spec.groups
    assert all(set(step) == {0} for step in text)  # one group at every step
    assert all(len(set(step)) > 1 for step in timestep)
