"""4-bit weights are stored two per byte everywhere lowbit keeps them: parameters, graph, saved models;
the arithmetic and the accounting read them as the codes they pack."""

import pytest
import torch

import lowbit
from lowbit.ir.annotations import QuantSpec
from lowbit.ir.packed_weights import PACKED_DTYPE, integer_codes, pack_int4, unpack_int4, unpacked_shape
from lowbit.ir.params import OperandParams
from lowbit.models.tiny import build
from lowbit.reports.accounting import cost
from tests.conftest import calibration_set


@pytest.mark.parametrize("shape", [(5, 8), (6, 4, 3, 3)])
def test_packing_round_trips_and_halves_the_bytes(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == PACKED_DTYPE and packed.numel() * 2 == codes.numel() and unpacked_shape(packed) == shape
    assert torch.equal(unpack_int4(packed), codes) and torch.equal(integer_codes(codes), codes)
    at = lambda t, channel: int(t[(0, channel) + (0,) * (len(shape) - 2)])  # noqa: E731
    assert at(packed, 0) == (at(codes, 0) & 15) | ((at(codes, 1) & 15) << 4)  # channel 0 in the low nibble


def test_only_weights_of_at_most_4_bits_with_an_even_channel_axis_are_packed():
    spec = QuantSpec(4, granularity="channel", axis=0, symmetric=True)
    even, odd = torch.randint(-8, 8, (3, 6), dtype=torch.int8), torch.randint(-8, 8, (3, 5), dtype=torch.int8)
    assert OperandParams.weight_storage(spec, even).dtype == PACKED_DTYPE
    assert OperandParams.weight_storage(spec, odd).dtype == torch.int8
    assert OperandParams.weight_storage(QuantSpec(8, granularity="channel", axis=0, symmetric=True), even).dtype == torch.int8
    params = OperandParams(spec, torch.ones(3, 1), torch.zeros(3, 1), qvalues=OperandParams.weight_storage(spec, even))
    params.check_fits(torch.Size((3, 6)))
    assert torch.equal(params.codes, even)
    with pytest.raises(ValueError, match="stored as torch.uint8"):  # an unpacked 4-bit weight is refused
        OperandParams(spec, torch.ones(3, 1), torch.zeros(3, 1), qvalues=even)


def test_a_w4a8_model_stores_packed_weights_computes_saves_and_counts_as_the_codes(tmp_path):
    model, calibration = build("pixart"), calibration_set("pixart")
    w4, w8 = (lowbit.quantize(model, recipe, calibration, progress=False) for recipe in ("minmax-w4a8", "minmax-w8a8"))
    packed = {t: p for t, p in w4.params.items() if p.qvalues is not None and p.spec.bits <= 4}
    assert packed and all(p.qvalues.dtype == PACKED_DTYPE for p in packed.values())
    buffers = {id(b) for b in w4.graph_module.buffers()}
    assert all(id(p.qvalues) in buffers for p in packed.values())  # the graph holds the packed tensor itself
    lowbit.save(w4, tmp_path / "w4")
    loaded = lowbit.load(tmp_path / "w4", model)
    assert all(torch.equal(loaded.params[t].qvalues, p.qvalues) for t, p in packed.items())
    kwargs = calibration[0][1]
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], w4(**kwargs)[0])
    c4, c8 = cost(w4, kwargs=kwargs), cost(w8, kwargs=kwargs)
    assert c4.flops == c8.flops and c4.bops < c8.bops and c4.size_bytes < c8.size_bytes
