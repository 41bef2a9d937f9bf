"""The project's VAR: a class-conditional next-scale-prediction model of the digits, with its tokenizer.

``load_var()`` gives the shipped transformer, tokenizer and a (labels, seeds) sampler; configs
that no one trained (VAR-d16's shape included) are built with ``VAR(VARConfig(...))``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.models.var.model import VAR, KVCache, VARConfig
from lowbit.models.var.sampling import PROTOCOL, SamplingProtocol, VARStep, make_sampler, sample, sample_tokens
from lowbit.models.var.tokenizer import MultiScaleVQ, TokenizerConfig

__all__ = ["KVCache", "MultiScaleVQ", "PROTOCOL", "SamplingProtocol", "TOKENIZER_WEIGHTS", "TokenizerConfig", "VAR",
           "VARConfig", "VARStep", "VAR_WEIGHTS", "load_tokenizer", "load_var", "make_sampler", "sample", "sample_tokens"]

_WEIGHTS = Path(__file__).parent.parent / "weights"
VAR_WEIGHTS = _WEIGHTS / "var.safetensors"
TOKENIZER_WEIGHTS = _WEIGHTS / "var_tokenizer.safetensors"


def _load(module_cls, config_cls, path: Path):
    from safetensors.torch import load_file

    config = config_cls(**json.loads(path.with_suffix(".json").read_text())["config"]["model"])
    module = module_cls(config)
    module.load_state_dict(load_file(str(path)))
    return module.eval().requires_grad_(False)


def load_tokenizer(path: Path = TOKENIZER_WEIGHTS) -> MultiScaleVQ:
    """The shipped multi-scale VQ tokenizer, eval mode, frozen."""
    return _load(MultiScaleVQ, TokenizerConfig, path)


def load_var(path: Path = VAR_WEIGHTS) -> VAR:
    """The shipped VAR transformer, eval mode, frozen (its tokenizer: ``load_tokenizer()``)."""
    return _load(VAR, VARConfig, path)
