import pytest

from lowbit.ir.annotations import AttentionInfo, LayerInfo, QuantAnnotation, QuantSpec


def test_integer_and_fractional_ranges():
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (0, 255)
    assert (QuantSpec(8, symmetric=True).qmin, QuantSpec(8, symmetric=True).qmax) == (-128, 127)
    # FraQAT: INT6 in [-32, 31], INT5.5 in [-22, 21], INT5 in [-16, 15]
    for bits, lo, hi in ((6, -32, 31), (5.5, -22, 21), (5, -16, 15)):
        spec = QuantSpec(bits, symmetric=True)
        assert (spec.qmin, spec.qmax) == (lo, hi)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), "bits must lie"),
    (dict(bits=17), "bits must lie"),
    (dict(bits=8, granularity="pixel"), "granularity must be one of"),
    (dict(bits=8, scheme="cubic"), "scheme must be one of"),
    (dict(bits=8, mode="sometimes"), "mode must be one of"),
    (dict(bits=8, granularity="channel"), "needs an axis"),
    (dict(bits=8, granularity="group", axis=-1, groups=((0, -1),)), "numbered from 0"),
    (dict(bits=8, granularity="group", axis=-1, groups=((0, 1), (0,))), "cover the same vectors"),
    (dict(bits=8, granularity="channel", axis=-1, groups=((0, 1),)), "only valid with granularity 'group'"),
    (dict(bits=8, axis=1), "takes no axis"),
    (dict(bits=8, scheme="log2", symmetric=True), "cannot be symmetric"),
])
def test_invalid_specs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_spec_and_round_trip():
    spec = QuantSpec(6, granularity="group", axis=-1, groups=((0, 1, 1, 0, 2), (1, 1, 0, 0, 0)), mode="per_step")
    assert spec.num_groups == 3
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_annotations_check_their_fields():
    with pytest.raises(ValueError, match="weights are quantized once"):
        QuantAnnotation(weight=QuantSpec(8, mode="dynamic"))
    with pytest.raises(TypeError, match="must be a QuantSpec"):
        QuantAnnotation(input=8)
    with pytest.raises(ValueError, match="kind must be one of"):
        LayerInfo("a.b", "pool")
    with pytest.raises(ValueError, match="equal length"):
        AttentionInfo("cross", "attn2", ("text",), (7, 3), heads=2, scale=0.1)
