"""lowbit figures: DGQ Figures 4 and 5 as PNGs, from what hooks record in a short sampling run."""

from PIL import Image

from lowbit.cli import main
from lowbit.evaluation.harness import prompt_set
from lowbit.figures import record
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


def test_figures_command_writes_both_pngs(tmp_path):
    out = tmp_path / "fig"
    assert main(["figures", "--layer", "transformer_blocks.0.ff.net.0.proj", "--prompts", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["activation_transformer_blocks.0.ff.net.0.proj.png", "attention_transformer_blocks.0.attn2.png"]
    assert all(Image.open(out / n).size[0] > 500 for n in names)  # real plots, not empty canvases


def test_figures_command_names_a_missing_layer(tmp_path, capsys):
    assert main(["figures", "--layer", "transformer_blocks.9.attn1.to_q", "--steps", "2", "--out", str(tmp_path / "f")]) == 2
    assert "no module 'transformer_blocks.9.attn1.to_q'" in capsys.readouterr().err
