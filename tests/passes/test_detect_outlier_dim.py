"""DGQ eq. 4-5 on planted outliers, for linear inputs and (im2col) convolution inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.ir.annotations import OUTLIER_KEY, LAYER_KEY
from lowbit.ir.capture import capture
from lowbit.ir.observers import observing
from lowbit.ir.precision import Precision
from lowbit.ir.statistics import RangeStatistics, spread
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.base import PassContext
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.passes.detect_outlier_dim import DetectOutlierDim, conv_unfold_ranges
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.pipeline import Pipeline
from tests.passes.conftest import tiny_inputs


class _LinearConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.lin = nn.Linear(16, 16), nn.Linear(16, 16)
        self.conv, self.last = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x, image, timestep):
        return self.lin(self.first(x)), self.last(self.conv(image))


def _detect(x_plant, image_plant):
    torch.manual_seed(0)
    model = _LinearConv().eval()
    # the planted inputs reach `lin` and `conv` through identity layers, so we plant on their inputs
    with torch.no_grad():
        model.first.weight.copy_(torch.eye(16)), model.first.bias.zero_()
    x, image = torch.randn(2, 10, 16) * 0.1, torch.randn(2, 4, 6, 6) * 0.1
    x_plant(x), image_plant(image)
    calib = {"x": x, "image": image, "timestep": torch.full((2,), 10.0)}
    ctx = PassContext(precision=Precision(8, 8, keep_io_layers=False))
    gm = Pipeline([CanonicalizeAttention(), AnnotateQuantization(), InsertObservers()]).run(
        capture(model, (), calib), ctx)
    with observing(gm, ctx.observations):
        gm(**calib)
    gm = Pipeline([DetectOutlierDim()]).run(gm, ctx)
    return {n.meta[LAYER_KEY].path: n.meta[OUTLIER_KEY]["input"] for n in gm.graph.nodes if OUTLIER_KEY in n.meta}


# Outliers as DGQ's Figure 4 shows them: a channel (or a pixel) that is consistently large, far
# beyond the others' range of about +-0.3 — not merely a noisier one.
def _channel(x):
    x[..., 5] += 20.0


def _pixel_tokens(x):
    x[:, 3, :] += 20.0


def _conv_channel(img):
    img[:, 2] += 20.0


def _conv_pixel(img):
    img[:, :, 3, 3] += 20.0


def test_planted_channel_outliers_pick_channel():
    found = _detect(_channel, _conv_channel)
    assert found["lin"].chosen == "channel" and found["lin"].channel_spread > 5 * found["lin"].token_spread
    assert found["conv"].chosen == "channel"


def test_planted_pixel_outliers_pick_token():
    found = _detect(_pixel_tokens, _conv_pixel)
    assert found["lin"].chosen == "token" and found["lin"].token_spread > 5 * found["lin"].channel_spread
    assert found["conv"].chosen == "token"


def test_spread_is_eq4():
    vmin, vmax = torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([1.0, 5.0, 2.0])
    assert spread(vmin, vmax) == (5 - 1) + (-1 - -3)


@pytest.mark.parametrize("padding", [0, 1])
def test_unfold_ranges_match_real_im2col(padding):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5)
    x[0, 1, 2, 4] = 9.0
    stats = RangeStatistics.of(x, "channels_first")
    (rmin, rmax), (cmin, cmax) = conv_unfold_ranges(stats, 5, 5, (3, 3), 1, padding, 1)
    cols = F.unfold(x, 3, padding=padding)  # (B, C*9, L)
    rows_true = cols.transpose(0, 1).reshape(2, 9, -1)  # by channel: each channel's 9 offsets pooled
    torch.testing.assert_close(rmax, rows_true.amax(dim=(1, 2)))
    torch.testing.assert_close(rmin, rows_true.amin(dim=(1, 2)))
    torch.testing.assert_close(cmax, cols.amax(dim=(0, 1)))
    torch.testing.assert_close(cmin, cols.amin(dim=(0, 1)))


def test_text_token_axes_are_marked(tiny):
    """Cross-attention keys/values and the linears that project the text have text-position tokens."""
    model, _ = tiny
    calib = tiny_inputs()
    ctx = PassContext(precision=Precision(8, 8, keep_io_layers=False))
    gm = Pipeline([CanonicalizeAttention(), AnnotateQuantization(), InsertObservers()]).run(
        capture(model, (), calib), ctx)
    with observing(gm, ctx.observations):
        gm(**calib)
    gm = Pipeline([DetectOutlierDim(text_input="text")]).run(gm, ctx)
    found = {n.meta[LAYER_KEY].path: n.meta[OUTLIER_KEY] for n in gm.graph.nodes if OUTLIER_KEY in n.meta}
    text = {f"{path}:{operand}" for path, per_op in found.items() for operand, d in per_op.items() if d.text_tokens}
    # "" is the SDPA self-attention, "@1" the baddbmm cross-attention whose keys come from `text`
    assert text == {"ck:input", "cv:input", "@1:key", "@1:value"}
