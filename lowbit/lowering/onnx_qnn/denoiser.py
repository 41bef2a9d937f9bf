"""A denoiser module backed by HTP sessions: the exported schedule as a diffusion pipeline sees it.

``HTPDenoiser(folder)`` loads each of the folder's per-timestep graphs (``export_schedule``) on the
HTP with CPU fallback disabled, and answers ``denoiser(hidden_states=..., encoder_hidden_states=..., timestep=..., ...)`` calls with
the session of that timestep — so a sampler runs the phone's graphs, step by step. Batches of
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
    def __init__(self, folder: str | Path, timestep_arg: str = "timestep", soc: str = DEFAULT_SOC):
        super().__init__()
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        self.batch = int(manifest["batch"])
        self.timestep_arg = timestep_arg
        steps = sorted(manifest["graphs"], key=float)
        paths = [folder / manifest["graphs"][t] for t in steps]
        self.codecs = {float(t): IOCodec.of(p) for t, p in zip(steps, paths)}  # each graph has its own I/O grids
        self.sessions = {float(t): htp_session(p, soc=soc) for t, p in zip(steps, paths)}
        self.inputs = [i.name for i in self.sessions[float(steps[0])].get_inputs()]

    def forward(self, *, return_dict: bool = False, **kwargs):
        t = float(torch.as_tensor(kwargs.pop(self.timestep_arg)).reshape(-1)[0])
        if t not in self.sessions:
            raise ValueError(f"no exported graph for timestep {t:g}; the schedule has {sorted(self.sessions)}")
        session = self.sessions[t]
        feeds = {k: torch.as_tensor(kwargs[k]).float().numpy() for k in self.inputs}
        total = next(iter(feeds.values())).shape[0]
        outs = []
        for start in range(0, total, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in feeds.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < self.batch:  # pad with the chunk's own first rows; their outputs are dropped
                chunk = {k: np.concatenate([v, np.repeat(v[:1], self.batch - n, axis=0)]) for k, v in chunk.items()}
            outs.append(self.codecs[t].run(session, chunk)[0][:n])
        return (torch.from_numpy(np.concatenate(outs)),)
