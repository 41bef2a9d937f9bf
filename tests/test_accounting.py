import torch
from torch import nn

import lowbit
from lowbit.reports.accounting import FP_BITS, cost


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, timestep):
        return self.b(torch.relu(self.a(x)))


def test_bops_are_flops_times_bits_and_size_counts_bits():
    torch.manual_seed(0)
    model = _TwoLinears().eval()
    calib = [((), {"x": torch.randn(2, 3, 8), "timestep": torch.full((2,), t)}) for t in (900.0, 100.0)]
    fp = cost(model, *calib[0])
    flops = 2 * 2 * 3 * (8 * 16 + 16 * 4)  # 2 · tokens · (in · out) per linear
    assert fp.flops == flops and fp.bops == flops * FP_BITS**2
    assert fp.size_bytes == 4 * (8 * 16 + 16 + 16 * 4 + 4) and fp.quant_param_bytes == 0

    recipe = lowbit.Recipe.build("all", 4, 8, keep_io_layers=False)
    q = cost(lowbit.quantize(model, recipe, calib, progress=False), *calib[0])
    assert q.flops == flops and q.bops == flops * 4 * 8
    # int4 weights at half a byte; biases, weight scales (4 B per output channel) and the per-timestep
    # activation tables (scale, zero point, timestep: 3 floats x 2 timesteps per layer) in float32
    params = 4 * (16 + 4) + 2 * 3 * 2 * 4
    assert q.size_bytes == (8 * 16 + 16 * 4) / 2 + 4 * (16 + 4) + params
    assert q.quant_param_bytes == params

    # groups count as K floats (scale, zero point) per timestep plus a one-byte label per channel
    grouped = lowbit.Recipe.build("g", 4, 8, keep_io_layers=False).with_pass("group_activations", groups=2, select_dim=False)
    g = cost(lowbit.quantize(model, grouped, calib, progress=False), *calib[0])
    group_tables = 2 * (2 * 2 * 4 + 8) + 2 * (2 * 2 * 4 + 16)  # layer a: 8 input channels, layer b: 16
    assert g.quant_param_bytes == params - 2 * 2 * 2 * 4 + group_tables

    # one group is the layer-wise baseline, and costs what it does: no labels to store
    single = lowbit.Recipe.build("g1", 4, 8, keep_io_layers=False).with_pass("group_activations", groups=1, select_dim=False)
    assert cost(lowbit.quantize(model, single, calib, progress=False), *calib[0]).quant_param_bytes == params
