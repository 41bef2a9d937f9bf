"""lowbit figures: DGQ Figures 4 and 5 as PNGs, from what hooks record in a short sampling run."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.cli import main
from lowbit.evaluation import figures
from lowbit.evaluation.harness import prompt_set
from lowbit.evaluation.figures import Recording, record, save_activation_heatmap, save_attention_histogram
from lowbit.models import text_encoder
from lowbit.models.stress import ATTENTION_OUTLIERS, load_stressed_reference_model


def test_recording_keeps_the_start_column_apart_and_drops_padding():
    prompts, steps = 2, 2
    rec = record(load_stressed_reference_model(), "transformer_blocks.1.attn1.to_q", "transformer_blocks.1.attn2",
                 prompts=prompts, steps=steps)
    assert tuple(rec.activation.shape) == (64, 128)  # one image: 8x8 tokens x 128 channels
    assert int(rec.activation.abs().amax(0).argmax()) in ATTENTION_OUTLIERS  # the planted channels stand out
    heads, queries = 4, 64
    texts, _, _ = prompt_set(prompts, "seen", 0)
    valid = int(text_encoder.encode(texts)[1].sum())  # unmasked text tokens over the prompts
    assert sum(len(v) for v in rec.start) == steps * prompts * heads * queries
    assert sum(len(v) for v in rec.rest) == steps * heads * queries * (valid - prompts)
    assert sum(len(v) for v in rec.self_attention) == steps * prompts * heads * queries * queries


@pytest.fixture
def drawn(monkeypatch):
    """The figures that lowbit.evaluation.figures would save, kept open to read what they draw."""
    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.append(fig) or path)
    yield figs
    for fig in figs:
        plt.close(fig)


def test_activation_heatmap_draws_abs_x_and_its_maxima(drawn, tmp_path):
    x = torch.tensor([[0.5, -1.0, 0.25, 2.0],
                      [-0.5, 1.5, -8.0, 1.0],
                      [1.0, -0.5, 0.5, -2.5]])  # 3 tokens x 4 channels; channel 2 of token 1 is the outlier
    save_activation_heatmap(x, "t", tmp_path / "a.png")
    heat, top, side = drawn[0].axes[:3]
    np.testing.assert_array_equal(heat.images[0].get_array(), [[0.5, 1.0, 0.25, 2.0], [0.5, 1.5, 8.0, 1.0],
                                                               [1.0, 0.5, 0.5, 2.5]])  # |x|
    # column maxima of |x| on top, row maxima beside
    assert [b.get_height() for b in top.containers[0]] == [1.0, 1.5, 8.0, 2.5]
    assert [b.get_width() for b in side.containers[0]] == [2.0, 8.0, 2.5]
    # 8 / median(1, 1.5, 8, 2.5) = 8 / 2 = 4.0; 8 / median(2, 8, 2.5) = 8 / 2.5 = 3.2
    assert "widest channel 2 at 4.0x the median channel max; widest token 1 at 3.2x" in top.get_title()


def test_attention_histogram_bins_log10_probabilities_per_group(drawn, tmp_path):
    rec = Recording()
    rec.start = [torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.03])]  # lists of tensors, as the hooks append them
    rec.rest = [torch.tensor([0.003, 0.0003, 0.003])]
    rec.self_attention = [torch.tensor([0.25, 0.125])]
    save_attention_histogram(rec, "t", tmp_path / "h.png")
    cross, self_ = drawn[0].axes
    # 80 bins of 0.1 over log10 p in [-8, 0]; bin i covers [-8 + 0.1 i, -7.9 + 0.1 i), each entry weighs 1 / (group size)
    #   start: log10 0.5 = -0.301 -> bin 76 (twice), log10 0.9 = -0.046 -> bin 79, log10 0.03 = -1.523 -> bin 64
    #   rest:  log10 0.003 = -2.523 -> bin 54 (twice), log10 0.0003 = -3.523 -> bin 44
    #   self:  log10 0.25 = -0.602 -> bin 73, log10 0.125 = -0.903 -> bin 70
    expected = {"start": {76: 2 / 4, 79: 1 / 4, 64: 1 / 4}, "rest": {54: 2 / 3, 44: 1 / 3}, "self": {73: 1 / 2, 70: 1 / 2}}
    bars = {"start": cross.containers[0], "rest": cross.containers[1], "self": self_.containers[0]}
    for group, bins in expected.items():
        heights = np.zeros(80)
        heights[list(bins)] = list(bins.values())
        # float64 sums of two 1/n weights: equal to a few ulps (rtol 1e-12)
        np.testing.assert_allclose([b.get_height() for b in bars[group]], heights, rtol=1e-12, atol=0, err_msg=group)
    # the legends give the geometric mean and the median of each group:
    #   start: (0.5 * 0.9 * 0.5 * 0.03) ** (1/4) = 0.00675 ** 0.25 = 0.287, median 0.5
    #   rest:  (0.003 * 0.0003 * 0.003) ** (1/3) = 2.7e-9 ** (1/3) = 0.00139, median 0.003
    #   self:  (0.25 * 0.125) ** (1/2) = 0.177, median 0.177
    assert cross.get_legend_handles_labels()[1] == ["start token (mean 0.29, median 0.5)",
                                                    "other text tokens (mean 0.0014, median 0.003)"]
    assert self_.get_legend_handles_labels()[1] == ["self-attention (mean 0.18, median 0.18)"]


def _near(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels within 3 levels of a colour (PNG rounding; antialiasing changes only a filled area's edges)."""
    return np.abs(image.astype(int) - np.array(rgb)).max(-1) <= 3


def test_figures_command_writes_both_pngs(tmp_path):
    out = tmp_path / "fig"
    assert main(["figures", "--layer", "transformer_blocks.0.ff.net.0.proj", "--prompts", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    pngs = ["activation_transformer_blocks.0.ff.net.0.proj.png", "attention_transformer_blocks.0.attn2.png"]
    assert names == [".lowbit-output", *pngs]
    activation, attention = (np.asarray(Image.open(out / n).convert("RGB")) for n in pngs)
    # The heatmap figure: the per-channel maxima (tab:red bars) above, the per-token maxima (tab:blue
    # bars) to the right, the heatmap between them. Measured: 19,000 red and 22,000 blue pixels, the
    # heatmap's box (left of the blue bars, level with them) 75% coloured; bounds well below that
    # and far above an empty panel (0). The largest |x| is both the tallest red bar and the heatmap's
    # brightest cell: their columns agree to 3 px (one channel is ~5 px wide; antialiasing blurs 1 px).
    red, blue = _near(activation, (214, 39, 40)), _near(activation, (31, 119, 180))
    assert red.sum() > 2000 and blue.sum() > 2000, (red.sum(), blue.sum())
    (red_y, red_x), (blue_y, blue_x) = np.nonzero(red), np.nonzero(blue)
    assert red_y.mean() < blue_y.min() and red_x.mean() < blue_x.min()  # bars above, and to the right
    box = activation[blue_y.min():blue_y.max() + 1, red_x.min():blue_x.min()].astype(int)
    coloured = box.max(-1) - box.min(-1) > 20  # magma shades, not the white, gray or black of the frame
    assert coloured.mean() > 0.5, coloured.mean()
    brightest = np.unravel_index(np.where(coloured, box.sum(-1), -1).argmax(), coloured.shape)[1] + red_x.min()
    tallest = red_x[red_y == red_y.min()]
    assert tallest.min() - 3 <= brightest <= tallest.max() + 3, (int(brightest), tallest.tolist())
    # The histogram figure: start-token (red) and other-token (blue) bars on the left panel,
    # self-attention (gray) on the right; matplotlib draws them at alpha 0.6 over white.
    # Measured: 1,700 red, 14,500 blue and 56,600 gray pixels; bounds a fifth of that.
    half = attention.shape[1] // 2
    for rgb, panel, least in (((230, 125, 126), slice(None, half), 300), ((121, 173, 210), slice(None, half), 2500),
                              ((178, 178, 178), slice(half, None), 10000)):
        count = int(_near(attention[:, panel], rgb).sum())
        assert count > least, (rgb, count)


def test_figures_command_names_a_missing_layer(tmp_path, capsys):
    assert main(["figures", "--layer", "transformer_blocks.9.attn1.to_q", "--steps", "2", "--out", str(tmp_path / "f")]) == 2
    assert "no module 'transformer_blocks.9.attn1.to_q'" in capsys.readouterr().err
