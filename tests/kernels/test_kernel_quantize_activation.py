"""Activation quantizers against their references and lowbit's fake_quant: integer codes must match exactly
(same IEEE division, same round-half-to-even), so every comparison here is equality."""

import pytest
import torch

from lowbit.ir.schema import FakeQuant
from lowbit.kernels.common import TINY, UINT8_OFFSET
from lowbit.ir.ops import dynamic_params
from lowbit.kernels.quantize_activation import (quantize_dynamic, quantize_gathered, quantize_per_token,
                                                quantize_per_token_reference, quantize_static, quantize_static_reference)

fake_quant = FakeQuant.overload()

M, K = 37, 70  # ragged against every block size


def _activations(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    x[3] = 0.0  # an all-zero row: scale TINY, no NaN
    x[4, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0])  # absmax 127: scale 1, exact ties
    x[4, 8:] = 0.25
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_matches_reference_and_fake_quant(device, dtype):
    x = _activations(dtype).to(device)
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_reference(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert scale[3] == TINY and not q[3].any()
    assert q[4, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, -127]  # half to even
    dq = fake_quant(x.float(), scale[:, None], torch.zeros(M, 1, device=device), -128, 127)
    assert torch.equal(q.float() * scale[:, None], dq)


@pytest.mark.parametrize("qmin, qmax", [(0, 255), (0, 15)])
def test_dynamic_matches_lowbit_dynamic_params_and_fake_quant(device, qmin, qmax):
    x = _activations().to(device)
    x[5] = torch.linspace(0.5, 3.0, K)  # an all-positive row: the range still holds 0, zero point at qmin
    q, scale, zero_point = quantize_dynamic(x, qmin, qmax)
    want_scale = dynamic_params(x, qmin, qmax, True, "scale")[:, 0]
    want_zp = dynamic_params(x, qmin, qmax, True, "zero_point")[:, 0]
    assert torch.equal(scale, want_scale) and torch.equal(zero_point, want_zp)
    assert zero_point[5] == qmin and scale[3] == 1e-8 and torch.all(q[3] == zero_point[3] - UINT8_OFFSET)
    dq = fake_quant(x, scale[:, None], zero_point[:, None], qmin, qmax)
    assert torch.equal((q.float() + UINT8_OFFSET - zero_point[:, None]) * scale[:, None], dq)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("qmin, qmax", [(0, 255), (0, 15)])
def test_static_matches_reference_and_fake_quant(device, per_row, qmin, qmax):
    x = _activations().to(device)
    if per_row:  # token groups: one scale and zero point per row; powers of two make ties exact
        scale = 2.0 ** -torch.randint(2, 6, (M, 1), generator=torch.Generator().manual_seed(1))
        zero_point = torch.randint(qmin, qmax + 1, (M, 1), generator=torch.Generator().manual_seed(2)).float()
    else:
        scale, zero_point = torch.tensor(0.25), torch.tensor(float((qmin + qmax) // 2 + 1))
    scale, zero_point = scale.to(device), zero_point.to(device)
    q = quantize_static(x, scale.reshape(-1), zero_point.reshape(-1), qmin, qmax)
    assert torch.equal(q, quantize_static_reference(x, scale, zero_point, qmin, qmax))
    assert q.min() == qmin - 128 and q.max() == qmax - 128  # the 3-sigma data clamps at both ends
    dq = fake_quant(x, scale, zero_point, qmin, qmax)
    assert torch.equal((q.float() + 128 - zero_point) * scale, dq)


def test_static_mixes_a_scalar_scale_with_per_row_zero_points(device):
    x = _activations().to(device)
    zero_point = torch.arange(M, dtype=torch.float32, device=device)
    q = quantize_static(x, 0.1, zero_point)
    assert torch.equal(q, quantize_static_reference(x, torch.tensor(0.1, device=device), zero_point[:, None]))


def test_gathered_reads_channels_with_their_group_parameters(device):
    x = _activations().to(device)
    g = torch.Generator().manual_seed(3)
    columns = torch.cat([torch.randperm(K, generator=g), torch.full((10,), -1)])  # 10 padding columns
    column_group = torch.randint(0, 3, (K + 10,), generator=g)
    group_scale = torch.tensor([0.05, 0.5, 0.01], device=device)
    group_zero_point = torch.tensor([128.0, 3.0, 250.0], device=device)
    q = quantize_gathered(x, columns, column_group, group_scale, group_zero_point)
    groups = column_group[:K].to(device)
    expected = quantize_static_reference(x[:, columns[:K].to(device)], group_scale[groups], group_zero_point[groups])
    assert torch.equal(q[:, :K], expected)
    assert not q[:, K:].any()


def test_static_rejects_signed_ranges(device):
    with pytest.raises(ValueError, match="unsigned"):
        quantize_static(torch.zeros(2, 2, device=device), 1.0, 0.0, -128, 127)
