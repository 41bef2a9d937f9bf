"""Shared fixtures: calibration sets for the tiny diffusers models."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, no oversubscription
    torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in the interpreter; set before any @triton.jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lowbit.models.tiny import TINY_MODELS

CALIBRATION_TIMESTEPS = (900.0, 500.0, 100.0)


def timestep_value(name: str, t: float) -> float:
    """FLUX takes timesteps in [0, 1] (flow matching); the others in [0, 1000)."""
    return t / 1000 if name == "flux" else t


def calibration_set(name: str, batch: int = 2, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for t in CALIBRATION_TIMESTEPS:
        kw = TINY_MODELS[name].inputs(batch, g)
        kw["timestep"] = torch.full((batch,), timestep_value(name, t))
        samples.append(((), kw))
    return samples


@pytest.fixture
def calib():
    return calibration_set


MIXED_RECIPE = """
name = "w4a8-mixed"
weight_bits = 4
activation_bits = 8
keep_io_layers = false

[layers."transformer_blocks.0.ff.*"]
weight_bits = 8
[layers."proj_out"]
float = true

[[passes]]
name = "canonicalize_attention"
[[passes]]
name = "annotate_quantization"
[[passes]]
name = "split_start_token"
[[passes]]
name = "insert_observers"
[[passes]]
name = "choose_quant_params"
weight_range = "mse"
[[passes]]
name = "convert_to_quantized_ops"
"""


@pytest.fixture
def mixed_recipe(tmp_path):
    """A recipe written only in TOML: a pass list with settings and per-layer tables (PixArt layer names)."""
    path = tmp_path / "w4a8-mixed.toml"
    path.write_text(MIXED_RECIPE)
    return path


def small_var(seed: int = 0):
    """A VAR config no shipped model uses (3 heads of 16, scales 1-2-4, 24 codes), its tokenizer,
    and the step module lowbit quantizes; random weights."""
    from lowbit.models.var import VAR, MultiScaleVQ, TokenizerConfig, VARConfig, VARStep

    torch.manual_seed(seed)
    var = VAR(VARConfig(depth=2, width=48, heads=3, patch_nums=(1, 2, 4), vocab_size=24, latent_channels=8)).eval()
    tokenizer = MultiScaleVQ(TokenizerConfig(patch_nums=(1, 2, 4), vocab_size=24, latent_channels=8, hidden=16)).eval()
    return var, tokenizer, VARStep(var)


def var_calibration(var, tokenizer, step, labels=(0, 1, 2, 3), seed: int = 0) -> list:
    """The step's inputs at every scale while the FP model samples ``labels``: ((), kwargs) pairs."""
    from lowbit.models.var import sample

    trace: list[dict] = []
    sample(step, var, tokenizer, torch.tensor(labels), [seed + i for i in range(len(labels))], trace=trace)
    return [((), kw) for kw in trace]
