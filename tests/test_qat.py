"""Quantization-aware training: the fractional grid, straight-through gradients, the bit-width buffer,
the schedule, training that lowers the distillation error on every family, resuming, and the
prepare/convert pair."""

import pytest
import torch

import lowbit
from lowbit.core.quantize import quantize
from lowbit.ir.bit_schedule import FRAQAT_SCHEDULE, BitSchedule
from lowbit.ir.fake_quantizers import WeightFakeQuantizer, fractional_grid
from lowbit.ir.training_history import HISTORY_ARTIFACT
from lowbit.models.tiny import TINY_MODELS, build
from lowbit.passes import PassError
from lowbit.passes.train_quantized import distillation_loss
from lowbit.recipes import get_recipe


@pytest.mark.parametrize("bits, grid", [(5.5, (-22, 21)), (4.25, (-9, 8)), (8, (-128, 127)), (4, (-8, 7)), (6, (-32, 31))])
def test_fractional_grid(bits, grid):
    """FraQAT's INT5.5 spans [-22, 21] (ANCHORS); floor(2^b) levels in general."""
    assert fractional_grid(bits) == grid
    w = torch.linspace(-1, 1, 1001).reshape(1, -1)
    quantizer = WeightFakeQuantizer("w", w, bits)
    codes = quantizer(w) / quantizer.scale(w)
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid
    assert codes.min() >= grid[0] - 1e-4 and codes.max() <= grid[1] + 1e-4
    assert int(codes.max().round()) == grid[1]  # max|W| reaches the top of the grid: the scale is max|W| / (2^(b-1) - 1)
    assert int(codes.min().round()) in (grid[0], grid[0] + 1)  # -max|W| rounds to -round(2^(b-1) - 1)


def test_fraqat_scale_is_the_papers():
    """Q = round((2^(b-1) - 1) / max|W| · W): at 5.5 bits the scale is max|W| / 21.63, not / 21."""
    w = torch.randn(4, 16)
    quantizer = WeightFakeQuantizer("w", w, 5.5)
    expected = w.abs().amax(1, keepdim=True) / (2 ** 4.5 - 1)
    assert torch.allclose(quantizer.scale(w), expected)


def test_gradients_pass_straight_through():
    w = torch.randn(8, 8)
    quantizer = WeightFakeQuantizer("w", w, 4)
    upstream = torch.randn(8, 8)
    (quantizer(w) * upstream).sum().backward()
    assert torch.allclose(quantizer.delta.grad, upstream, rtol=1e-6)  # d Q(W + Δ) / dΔ taken as the identity (s · 1/s)


def test_lsq_step_is_learned_and_rescaled_with_the_bit_width():
    w = torch.randn(8, 8)
    quantizer = WeightFakeQuantizer("w", w, 4, lsq=True)
    quantizer(w).pow(2).sum().backward()
    assert quantizer.step.grad is not None and quantizer.step.grad.abs().sum() > 0
    before = quantizer.step.detach().clone()
    quantizer.set_bits(8)
    assert torch.allclose(quantizer.step, before * 7 / 127)  # same ratio to max|W| / (2^(b-1) - 1)


def test_schedule_stages_scale_to_the_budget():
    fraqat = BitSchedule(FRAQAT_SCHEDULE, 25)  # the paper's 25 epochs: one step each
    assert fraqat.starts() == [0, 1, 2, 3, 4, 5, 7, 9, 11]
    assert [fraqat.above_final(s) for s in (0, 4, 5, 6, 11, 24)] == [4, 1, 0.75, 0.75, 0, 0]
    halving = next(p for p in _recipe("qat-halving-w4a8", 100).pipeline() if p.name == "train_quantized").schedule  # the recipe's
    assert [halving.above_final(s) for s in (0, 24, 25, 49, 50, 99)] == [12, 12, 4, 4, 0, 0]
    tiny = BitSchedule(FRAQAT_SCHEDULE, 3)  # stages too short for the budget are skipped, the last is kept
    assert tiny.above_final(2) == 0
    with pytest.raises(ValueError, match="must end at the final bit-width"):
        BitSchedule(((4, 1), (1, 1)), 10)


def _recipe(name: str, steps: int, **settings):
    return get_recipe(name).with_settings("train_quantized", qat_steps=steps, **settings)


def _error(qmodel, model, calibration) -> float:
    with torch.no_grad():
        return sum(float(distillation_loss(qmodel(**kw), model(**kw))) for _, kw in calibration) / len(calibration)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_qat_lowers_the_distillation_error_on_every_family(name, calib):
    """W3A8 (where rounding to nearest hurts): 30 steps of plain QAT bring the quantized model closer to
    full precision than post-training minmax at the same bits, on the calibration inputs it trained on."""
    model, calibration = build(name), calib(name)
    ptq = quantize(model, "minmax-w3a8", calibration, progress=False)
    qat = quantize(model, _recipe("qat-w3a8", 30, lr=1e-4), calibration, progress=False)
    history = qat.artifacts[HISTORY_ARTIFACT]
    assert len(history.loss) == 30 and torch.isfinite(history.loss).all()
    assert _error(qat, model, calibration) < 0.9 * _error(ptq, model, calibration)


def test_bit_width_buffer_changes_the_grid_without_recapture(calib):
    model, calibration = build("pixart"), calib("pixart")
    prepared = lowbit.prepare_qat(model, "fraqat-w4a8", calibration, progress=False)
    graph = prepared.graph_module
    _, kwargs = calibration[0]
    outputs = {}
    for bits in (8, 5.5, 4):
        prepared.set_bits(bits)
        with torch.no_grad():
            outputs[bits] = prepared(**kwargs)[0]
        assert prepared.graph_module is graph  # the same graph: only the buffers changed
    with torch.no_grad(), prepared.teacher():
        teacher = prepared(**kwargs)[0]
    error = {b: float((o - teacher).pow(2).mean()) for b, o in outputs.items()}
    assert error[8] < error[5.5] < error[4]
    quantizer = prepared.weight_quantizers()[0]
    assert float(quantizer.bits) == 4
    values = quantizer(torch.randn_like(quantizer.delta)).detach()
    assert max(len(row.unique()) for row in values.reshape(len(values), -1)) <= 16  # 4 bits: at most 2^4 values per channel


def train_in_own_loop(prepared, batches) -> None:
    """What a user writes around prepare_qat: distillation against the model's own teacher, Adam."""
    optimizer = torch.optim.Adam(prepared.trainable_parameters(), lr=1e-3)
    for _, kwargs in batches:
        with torch.no_grad(), prepared.teacher():
            target = prepared(**kwargs)
        loss = distillation_loss(prepared(**kwargs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_prepare_train_convert_in_your_own_loop(calib, tmp_path):
    """The user-loop pair trains without touching the user's model, and its result saves and loads."""
    model, calibration = build("pixart"), calib("pixart")
    owned = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    prepared = lowbit.prepare_qat(model, "qat-w4a8", calibration, progress=False)
    train_in_own_loop(prepared, calibration)
    qmodel = lowbit.convert_qat(prepared)
    # the user's model is untouched: the same parameters, flags and no gradient
    assert {name: (p, p.requires_grad) for name, p in model.named_parameters()} == owned
    assert all(p.grad is None for p in model.parameters())
    path = lowbit.save(qmodel, tmp_path / "qat")
    loaded = lowbit.load(path, model)
    _, kwargs = calibration[1]
    with torch.no_grad():
        assert torch.equal(qmodel(**kwargs)[0], loaded(**kwargs)[0])
    untrained = quantize(model, "minmax-w4a8", calibration, progress=False)
    with torch.no_grad():
        assert not torch.equal(qmodel(**kwargs)[0], untrained(**kwargs)[0])


def test_a_resumed_run_matches_an_uninterrupted_one(calib, tmp_path):
    model, calibration = build("pixart"), calib("pixart")
    whole = quantize(model, _recipe("fraqat-w4a8", 8, lr=1e-3, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4),
                     calibration, progress=False)
    checkpoints = sorted((tmp_path / "a").glob("step-*.safetensors"))
    assert [c.name for c in checkpoints] == ["step-0000004.safetensors", "step-0000008.safetensors"]
    checkpoints[-1].unlink()  # as if killed after step 4
    resumed = quantize(model, _recipe("fraqat-w4a8", 8, lr=1e-3, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4),
                       calibration, progress=False)
    for key in whole.params:
        assert torch.equal(whole.params[key].scale, resumed.params[key].scale), key
        if whole.params[key].qvalues is not None:
            assert torch.equal(whole.params[key].qvalues, resumed.params[key].qvalues), key
    assert torch.equal(whole.artifacts[HISTORY_ARTIFACT].loss, resumed.artifacts[HISTORY_ARTIFACT].loss)
    with pytest.raises(PassError, match="other settings"):
        quantize(model, _recipe("fraqat-w4a8", 8, lr=1e-2, checkpoint_dir=str(tmp_path / "a")), calibration, progress=False)


def test_learned_step_sizes_reach_the_quantized_model(calib):
    """LSQ: the step is trained (it moves from FraQAT's max|W| / 7) and is the scale the quantized model uses."""
    model, calibration = build("pixart"), calib("pixart")
    prepared = lowbit.prepare_qat(model, get_recipe("qat-w4a8").with_pass("insert_fake_quantizers", lsq=True), calibration,
                                  progress=False)
    quantizer = next(q for q in prepared.weight_quantizers() if q.target == "transformer_blocks.0.ff.net.0.proj:weight")
    start = quantizer.step.detach().clone()
    train_in_own_loop(prepared, calibration * 2)
    learned = quantizer.step.detach().reshape(-1).clone()
    assert not torch.allclose(learned, start.reshape(-1))
    weight = lowbit.convert_qat(prepared).params["transformer_blocks.0.ff.net.0.proj:weight"]
    torch.testing.assert_close(weight.scale, learned)
    assert weight.codes.min() >= -8 and weight.codes.max() <= 7


def test_fold_refuses_an_unfinished_schedule(calib):
    model, calibration = build("pixart"), calib("pixart")
    prepared = lowbit.prepare_qat(model, "qat-w4a8", calibration, progress=False)
    prepared.set_bits(6)
    with pytest.raises(PassError, match="finish the schedule"):
        lowbit.convert_qat(prepared)


def test_training_history_is_saved_with_the_model(calib, tmp_path):
    model, calibration = build("pixart"), calib("pixart")
    qmodel = quantize(model, _recipe("qat-int-w4a8", 8), calibration, progress=False)
    history = qmodel.artifacts[HISTORY_ARTIFACT]
    assert history.bits.tolist() == [8, 7, 6, 5, 4, 4, 4, 4]  # 8 -> 7 -> 6 -> 5 -> 4, half the budget at 4
    loaded = lowbit.load(lowbit.save(qmodel, tmp_path / "m"), model)
    assert torch.equal(loaded.artifacts[HISTORY_ARTIFACT].loss, history.loss)
