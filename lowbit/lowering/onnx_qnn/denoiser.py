"""A denoiser module backed by HTP sessions: the exported schedule as a sampler sees it.

``HTPDenoiser(folder)`` loads each of the folder's per-step graphs (``export_schedule``) on the
HTP with CPU fallback disabled, and answers ``denoiser(hidden_states=..., encoder_hidden_states=..., timestep=..., ...)``
calls (or a VAR step's ``step(hidden=..., cond=..., scale=..., past_keys=(...), past_values=(...))``)
with the session of that step — so a sampler runs the phone's graphs, step by step, and gets
every output back (a VAR step's logits and its extended KV cache). Inputs are matched to the
graph's inputs by placeholder name; an input the graph folded (an empty cache) is not fed. Batches of
another size than the exported one are cut into the static batch and padded. (The weight-shared
context binary of all timesteps, ``compile_context``, is for the phone: measured, the x86 HTP
backend writes it but cannot load a multi-graph context back — QNN_COMMON_ERROR_NOT_SUPPORTED.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowbit.lowering.onnx_qnn.export import MANIFEST
from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC, IOCodec, htp_session

__all__ = ["HTPDenoiser"]


class HTPDenoiser(torch.nn.Module):
    def __init__(self, folder: str | Path, step_arg: str = "timestep", soc: str = DEFAULT_SOC):
        super().__init__()
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        self.batch = int(manifest["batch"])
        self.step_arg = step_arg
        steps = sorted(manifest["graphs"], key=float)
        paths = [folder / manifest["graphs"][t] for t in steps]
        self.codecs = {float(t): IOCodec.of(p) for t, p in zip(steps, paths)}  # each graph has its own I/O grids
        self.sessions = {float(t): htp_session(p, soc=soc) for t, p in zip(steps, paths)}

    def forward(self, *, return_dict: bool = False, **kwargs):
        t = float(torch.as_tensor(kwargs.pop(self.step_arg)).reshape(-1)[0])
        if t not in self.sessions:
            raise ValueError(f"no exported graph for step {t:g}; the schedule has {sorted(self.sessions)}")
        session = self.sessions[t]
        flat = _by_placeholder_name(kwargs)
        feeds = {i.name: flat[i.name].float().numpy() for i in session.get_inputs()}
        total = next(iter(feeds.values())).shape[0]
        outs = []
        for start in range(0, total, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in feeds.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < self.batch:  # pad with the chunk's own first rows; their outputs are dropped
                chunk = {k: np.concatenate([v, np.repeat(v[:1], self.batch - n, axis=0)]) for k, v in chunk.items()}
            outs.append([o[:n] for o in self.codecs[t].run(session, chunk)])
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outs))


def _by_placeholder_name(kwargs: dict) -> dict[str, torch.Tensor]:
    """Inputs by the names torch.export gives their placeholders: ``past_keys=(a, b)`` becomes
    ``past_keys_0``, ``past_keys_1``."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, (tuple, list)):
            out |= {f"{name}_{i}": torch.as_tensor(v) for i, v in enumerate(value)}
        elif value is not None:
            out[name] = torch.as_tensor(value)
    return out
