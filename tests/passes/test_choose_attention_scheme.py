"""choose_attention_scheme on planted attention: the choice is the candidate with the least output error."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.ir.attention_schemes import ATTENTION_SCHEMES
from lowbit.ir.attention_statistics import CANDIDATES
from lowbit.ir.ops import quantize_probs
from lowbit.ir.schema import QuantizedAttention, schema_class
from lowbit.reports.layer_report import layer_report


class PlantedCrossAttention(nn.Module):
    """Image tokens attend to text tokens; ``key_bias`` plants the attention's shape: a start-token
    peak with a tail over many octaves ("sink": logits +10 and N(0, 2²)), or nearly equal weights
    ("spread"). V has a common part (``to_v``'s bias), so mass lost from the tail shows in the output."""

    def __init__(self, shape: str, dim: int = 16, text_tokens: int = 1024):
        super().__init__()
        torch.manual_seed(0)  # the linears' initial weights
        g = torch.Generator().manual_seed(1)
        self.inp, self.out = nn.Linear(4, dim), nn.Linear(dim, 4)
        self.attn = Attention(dim)
        bias = torch.zeros(text_tokens, dim)
        if shape == "sink":  # logits: start token +10, the others N(0, 2²)
            bias[:, 0] = torch.randn(text_tokens, generator=g) * 2
            bias[0, 0] = 10.0
        self.register_buffer("key_bias", bias)

    def forward(self, sample, timestep, text):
        return self.out(self.attn(self.inp(sample), text, self.key_bias))


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(6, dim), nn.Linear(6, dim)
        direction = torch.zeros(dim)
        direction[0] = 1.0
        with torch.no_grad():
            self.to_q.bias.copy_(direction * 4)  # q = 4·e0 + a query's own part: logits ≈ key_bias[:, 0] · (1 + noise)
            self.to_k.weight.mul_(0.05)
            self.to_v.bias.fill_(1.0)

    def forward(self, h, text, key_bias):
        q, k, v = self.to_q(h), self.to_k(text) + key_bias, self.to_v(text)
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def _calibration():
    """One CFG-sized batch at each of three steps."""
    g = torch.Generator().manual_seed(0)
    return [((), dict(sample=torch.randn(2, 32, 4, generator=g), timestep=torch.full((2,), float(t)),
                      text=torch.randn(2, 1024, 6, generator=g))) for t in (900, 500, 100)]


def _output_errors(model, samples) -> torch.Tensor:
    """Σ ‖(Q(P) − P) V‖² per candidate over the samples, from the model's own P and V."""
    out = torch.zeros(len(CANDIDATES), dtype=torch.float64)
    with torch.no_grad():
        for _, kw in samples:
            attn = model.attn
            q, k, v = attn.to_q(model.inp(kw["sample"])), attn.to_k(kw["text"]) + model.key_bias, attn.to_v(kw["text"])
            p = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
            for c, (scheme, split) in enumerate(CANDIDATES):
                err = quantize_probs(p, None, None, scheme, 0, 63, 0 if split else -1, True) - p
                out[c] += float((err @ v).double().pow(2).sum())
    return out


@pytest.mark.parametrize("shape, scheme", [("sink", "log2"), ("spread", "uniform")])
def test_auto_picks_log2_for_a_sink_and_uniform_for_spread_attention(shape, scheme):
    model = PlantedCrossAttention(shape).eval()
    samples = _calibration()
    qmodel = lowbit.quantize(model, "dgq-w8a6-auto", samples, progress=False)
    schemes = qmodel.artifacts[ATTENTION_SCHEMES]
    start_mass = float(schemes.start_mass[0])  # the mean start-column probability per query, as calibration saw it
    assert (start_mass > 0.5) if shape == "sink" else (start_mass < 0.1)
    assert schemes.layers == ("attn",) and schemes.choice("inp") is None
    chosen, split = schemes.choice("attn")
    assert chosen == scheme
    op = next(QuantizedAttention.of(n) for n in qmodel.graph_module.graph.nodes if schema_class(n) is QuantizedAttention)
    assert op.probs_scheme == scheme and (op.start_token == 0) == split
    # the measured errors are each candidate's output error on the calibration maps, computed here by hand
    expected = _output_errors(model, samples)
    torch.testing.assert_close(schemes.errors[0].sum(0), expected, rtol=1e-4, atol=0)
    assert schemes.candidates.index(schemes.chosen[0]) == int(expected.argmin())
    assert float(schemes.per_step_gain()[0]) <= 1.0
    row = next(r for r in layer_report(qmodel) if r.op == "attention")
    assert row.attention == schemes.chosen[0]


def test_auto_model_saves_and_loads_with_its_choice(tmp_path):
    model = PlantedCrossAttention("sink").eval()
    samples = _calibration()
    qmodel = lowbit.quantize(model, "dgq-w8a6-auto", samples, progress=False)
    lowbit.save(qmodel, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", model)
    assert loaded.artifacts[ATTENTION_SCHEMES].chosen == qmodel.artifacts[ATTENTION_SCHEMES].chosen
    inputs = samples[0][1]
    torch.testing.assert_close(loaded(**inputs), qmodel(**inputs), rtol=0, atol=0)


def test_static_auto_scale_comes_from_the_chosen_scheme(tmp_path):
    """With per-step (static) probability ranges, the range pass runs after the choice and fits it,
    and the saved spec (decided) loads against the recipe's (still "auto")."""
    recipe = lowbit.Recipe.build("auto-static", 8, 6).with_pass("split_start_token").with_pass("choose_attention_scheme")
    recipe = dataclasses.replace(recipe, precision=dataclasses.replace(recipe.precision, attention_scheme="auto"))
    model, samples = PlantedCrossAttention("sink").eval(), _calibration()
    qmodel = lowbit.quantize(model, recipe, samples, progress=False)
    (layer,) = qmodel.artifacts[ATTENTION_SCHEMES].layers
    params = qmodel.params[f"{layer}:probs"]
    assert params.spec.scheme == qmodel.artifacts[ATTENTION_SCHEMES].choice(layer)[0]
    assert params.timesteps.numel() == 3
    lowbit.save(qmodel, tmp_path / "q")
    inputs = samples[0][1]
    torch.testing.assert_close(lowbit.load(tmp_path / "q", model)(**inputs), qmodel(**inputs), rtol=0, atol=0)


def test_candidate_errors_do_not_depend_on_the_slices_they_are_computed_in(monkeypatch):
    """Maps are quantized a few (batch, head) slices at a time with the whole call's scales."""
    from lowbit.ir import attention_statistics

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 40, generator=g) * 2
    logits[..., 0] += 4
    probs, v = torch.softmax(logits, -1), torch.randn(2, 3, 40, 8, generator=g) + 1
    whole = attention_statistics.CandidateErrors.of(probs, v, 0, 64)
    monkeypatch.setattr(attention_statistics, "_CHUNK", 16 * 40)  # one (batch, head) slice at a time
    sliced = attention_statistics.CandidateErrors.of(probs, v, 0, 64)
    torch.testing.assert_close(sliced.squared, whole.squared, rtol=1e-6, atol=0)
    for c, (scheme, split) in enumerate(CANDIDATES):  # and both equal quantizing the whole call at once
        err = quantize_probs(probs, None, None, scheme, 0, 63, 0 if split else -1, True) - probs
        assert float(whole.squared[c]) == pytest.approx(float((err @ v).double().pow(2).sum()), rel=1e-6)
