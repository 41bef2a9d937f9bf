"""4-bit weights stay packed two per byte on the compile targets: the CPU int4 kernel equals the reference
arithmetic, and a compiled W4A8 model runs it (and the Triton int4 GEMM) without an int8 copy of its weights."""

import pytest
import torch

import lowbit
from lowbit.ir.ops import linear_reference
from lowbit.ir.packed_weights import PACKED_DTYPE, pack_int4
from lowbit.lowering import int4_linear as int4, onednn
from lowbit.lowering.native import has_int8_brgemm
from lowbit.models.tiny import build
from tests.conftest import calibration_set

needs_kernel = pytest.mark.skipif(not has_int8_brgemm(), reason="the int4 kernel needs AVX512 and ATen's u8 x s8 brgemm")


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(37, 64, 45), (1100, 132, 130)])  # rows across two tasks; channels past a block
@pytest.mark.parametrize("grid", [(0, 255), (-128, 127), (0, 63)])
@pytest.mark.parametrize("per_row", [False, True])
def test_int4_kernel_equals_reference(m, k, n, grid, per_row):
    g = torch.Generator().manual_seed(m + k + grid[1])
    x = torch.randn(m, k, generator=g) * 3
    weight = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
    shape = (m, 1) if per_row else ()
    scale = torch.rand(shape, generator=g) / 10 + 0.01
    zero_point = torch.randint(grid[0], grid[1] + 1, shape, generator=g).float()
    bias = torch.randn(n, generator=g) if per_row else None
    args = (x, weight, torch.rand(n, generator=g) / 100, bias, scale, zero_point, *grid)
    # exact integer sums; float32 rounding of the reference's matmul and of the epilogue
    torch.testing.assert_close(int4.int4_linear(*args), linear_reference(*args), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("grid", [(0, 255), (0, 63)])
def test_int4_kernel_applies_gelu_and_writes_the_next_layers_codes(approximate, grid):
    g = torch.Generator().manual_seed(len(approximate) + grid[1])
    m, k, n = 70, 64, 100
    x = torch.randn(m, k, generator=g) * 3
    weight = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
    args = (x, weight, torch.rand(n, generator=g) / 100, torch.randn(n, generator=g), torch.tensor(0.05), torch.tensor(120.0), 0, 255)
    codes, scale, zero_point = int4._rows(x, *args[4:], False)
    out_scale, out_zero = torch.tensor(0.02), torch.tensor(float(grid[1] // 4))
    got = int4.int4_matmul(codes, scale, zero_point, *args[1:4], approximate, out_scale, out_zero, list(grid))
    y = torch.nn.functional.gelu(linear_reference(*args), approximate=approximate)
    want = torch.clamp(torch.round(y / out_scale) + out_zero, *grid) - grid[0]
    assert got.dtype == torch.uint8
    assert (got.float() - want).abs().max() <= 1 and (got.float() != want).float().mean() < 0.01  # a code boundary, at most


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _w4a8_pixart():
    torch._dynamo.reset()
    model, calibration = build("pixart"), calibration_set("pixart")
    return model, calibration, lowbit.quantize(model, "minmax-w4a8", calibration, progress=False)


@needs_kernel
def test_compiled_w4a8_runs_the_int4_kernel_on_packed_weights():
    model, calibration, qmodel = _w4a8_pixart()
    packed = [p.qvalues for p in qmodel.params.values() if p.qvalues is not None and p.spec.bits <= 4]
    assert packed and all(w.dtype == PACKED_DTYPE for w in packed)
    kwargs = calibration[1][1]
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = torch.compile(qmodel, backend="lowbit")(**kwargs)[0]
    assert "lowbit_native::int4_linear" in {event.key for event in profile.key_averages()}
    with torch.no_grad():
        eager, fp = qmodel(**kwargs)[0], model(**kwargs)[0]
    assert _relative(out, eager) < 0.5 * _relative(eager, fp)  # as tests/lowering/test_cpu_backend.py
    ids = {id(w) for w in packed}
    assert not ids & {id(w) for w in onednn._PACKED.keys()}  # no byte-per-value copy of a 4-bit weight
    copies = {id(w): (w, int4._KERNEL_WEIGHTS[w]) for w in packed if w in int4._KERNEL_WEIGHTS}
    for w, copy in copies.values():  # the kernel's own order, still half a byte per value (channels padded to 64)
        assert copy.blocks.dtype == torch.uint8 and copy.blocks.numel() == -(-w.shape[0] // 64) * 64 * w.shape[1]
    assert copies


def test_triton_target_reads_packed_weights_in_place(monkeypatch):
    """The Triton int4 GEMM's prepared weight is the stored packed buffer itself (prepared on the CPU: no GEMM runs)."""
    from lowbit.lowering import triton as triton_target

    _, _, qmodel = _w4a8_pixart()
    packed = next(p for p in qmodel.params.values() if p.qvalues is not None and p.spec.bits <= 4)
    prepared = triton_target._prepared(packed.qvalues, packed.scale)
    assert prepared.bits == 4 and prepared.data.data_ptr() == packed.qvalues.data_ptr()
    assert prepared.in_features == 2 * packed.qvalues.shape[1]
