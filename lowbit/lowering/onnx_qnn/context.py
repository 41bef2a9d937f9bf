"""The EPContext binary a phone loads: the QNN context compiled once, on the host.

``compile_context`` compiles one or more exported graphs (the timesteps of a schedule) into one
QNN context; with several graphs the sessions share it (``ep.share_ep_contexts``), so QNN stores
weights that the graphs have in common — identical initializer names and bytes, which
``export_onnx`` guarantees for weights — once, and the last session writes the single .bin that
every ``*_ctx.onnx`` model points to. Measured: the x86 HTP backend writes a
multi-graph shared context but cannot load it back (QNN_COMMON_ERROR_NOT_SUPPORTED); a
single-graph context loads here too.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC, htp_session

__all__ = ["compile_context", "context_path"]


def context_path(model_path: str | Path, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{Path(model_path).stem}_ctx.onnx"


def compile_context(model_paths: list[str | Path], out_dir: str | Path, *, soc: str = DEFAULT_SOC) -> list[Path]:
    """EPContext models (``<stem>_ctx.onnx``) for ``model_paths``, all reading one context binary
    compiled for the HTP of ``soc``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    shared = len(model_paths) > 1
    for i, path in enumerate(model_paths):
        target = context_path(path, out_dir)
        htp_session(path, soc=soc, context_path=target, share_context=shared, last_shared=i == len(model_paths) - 1)
        outputs.append(target)
    return outputs
