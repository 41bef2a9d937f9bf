"""onnxruntime sessions on the QNN HTP backend, as measured on this machine (DESIGN.md).

onnxruntime-qnn 2.x is a plugin execution provider: it is registered once per process, its
device picked by ``ep_name``, and the HTP needs the target named (``SOCS``: by default v79 /
SoC 69, the Snapdragon 8 Elite) or finalizing fails. ``session.disable_cpu_ep_fallback=1`` turns
any node the HTP cannot take into a session error — the test of "QNN-ready".
``ep.context_enable=1`` writes the EPContext model (an ONNX file with one EPContext node) and the
context binary a phone loads.

The graph's inputs and outputs are integer tensors (legalize.py); ``IOCodec`` quantizes inputs and
dequantizes outputs on the host, in float32, with the grids recorded in the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lowbit.lowering.onnx_qnn.legalize import IO_KEY

__all__ = ["DEFAULT_SOC", "EP_NAME", "HTP_OPTIONS", "IOCodec", "SOCS", "float_weight_bits", "htp_options", "htp_session",
           "register_qnn"]

EP_NAME = "QNNExecutionProvider"
# Graph finalization mode 3 (the most optimized graph). Measured on the x86 HTP backend: the
# default mode (2) crashes (segfault in run) on the SD-1.x UNet, and mode 1 computes Sana's second
# batch element wrongly (a final Reshape-Transpose pair); mode 3 runs both right.
HTP_OPTIONS = {"backend_type": "htp", "htp_graph_finalization_optimization_mode": "3"}
# Snapdragon SoCs as QNN names them: (HTP architecture, soc_model id of the QNN SDK's device table).
# Measured on the x86 HTP backend with the reference model at W8A8: v73, v75, v79 and v81 take every
# node; v69 leaves the Gemms of the layers kept at 16-bit weights (the first and last) to the CPU,
# and takes them with 8-bit weights (``float_weight_bits``).
SOCS = {
    "sm8450": ("69", "36"),  # Snapdragon 8 Gen 1
    "sm8550": ("73", "43"),  # Snapdragon 8 Gen 2
    "sm8650": ("75", "57"),  # Snapdragon 8 Gen 3
    "sm8750": ("79", "69"),  # Snapdragon 8 Elite
    "sm8850": ("81", "87"),  # Snapdragon 8 Elite Gen 5
}
DEFAULT_SOC = "sm8750"
_registered = False


def register_qnn() -> None:
    """Register the onnxruntime-qnn plugin with onnxruntime (once per process)."""
    global _registered
    if _registered:
        return
    import onnxruntime_qnn

    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    _registered = True


def float_weight_bits(soc: str = DEFAULT_SOC) -> int:
    """The weight width for layers lowbit keeps in full precision that the HTP of ``soc`` takes: 16 bits,
    but 8 on v69 (Snapdragon 8 Gen 1), whose Gemm has no 16-bit weights (measured)."""
    htp_options(soc)
    return 8 if int(SOCS[soc][0]) < 73 else 16


def htp_options(soc: str = DEFAULT_SOC) -> dict[str, str]:
    """The QNN execution provider's options for the HTP of ``soc`` (a key of ``SOCS``)."""
    if soc not in SOCS:
        raise ValueError(f"unknown SoC {soc!r}; lowbit knows {', '.join(SOCS)} (QNN's names; {DEFAULT_SOC} is the Snapdragon 8 Elite)")
    arch, soc_model = SOCS[soc]
    return {**HTP_OPTIONS, "htp_arch": arch, "soc_model": soc_model}


def htp_session(model: str | Path | bytes, *, soc: str = DEFAULT_SOC, cpu_fallback: bool = False,
                context_path: str | Path | None = None, share_context: bool = False, last_shared: bool = False,
                record_placement: bool = False, extra_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session on the HTP of ``soc`` (default: the Snapdragon 8 Elite, v79 / SoC 69).

    ``context_path`` writes the EPContext model there (and its .bin beside it); ``share_context``
    puts this session's graph in one QNN context with the other sharing sessions, whose weights QNN
    then stores once; the session marked ``last_shared`` writes that shared context binary.
    """
    register_qnn()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record_placement:
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context_path is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context_path))
        options.add_session_config_entry("ep.context_embed_mode", "0")
    if share_context:
        options.add_session_config_entry("ep.share_ep_contexts", "1")
        if last_shared:
            options.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    options.add_provider_for_devices(devices, {**htp_options(soc), **(extra_options or {})})
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options)


@dataclass(frozen=True)
class IOCodec:
    """The integer grids of a legalized model's inputs and outputs."""

    grids: dict[str, dict]

    @classmethod
    def of(cls, model: onnx.ModelProto | str | Path) -> IOCodec:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=False)
        value = next((p.value for p in model.metadata_props if p.key == IO_KEY), None)
        if value is None:
            raise ValueError("the model has no lowbit I/O grids: export it with lowbit.export_onnx")
        return cls(json.loads(value))

    def encode(self, name: str, value: np.ndarray) -> np.ndarray:
        """Codes on the input's grid; ``step`` > 1: an 8-bit grid carried in a 16-bit container."""
        g = self.grids[name]
        dtype, step = np.dtype(g["dtype"]), int(g.get("step", 1))
        levels = (int(np.iinfo(dtype).max) + 1) // step
        codes = np.round(np.asarray(value, np.float32) / np.float32(g["scale"] * step)) + g["zero_point"] // step
        return (np.clip(codes, 0, levels - 1) * step).astype(dtype)

    def decode(self, name: str, codes: np.ndarray) -> np.ndarray:
        g = self.grids[name]
        return ((codes.astype(np.float32) - np.float32(g["zero_point"])) * np.float32(g["scale"])).astype(np.float32)

    def run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run with float inputs and get float outputs."""
        names = [o.name for o in session.get_outputs()]
        codes = session.run(names, {k: self.encode(k, v) for k, v in feeds.items()})
        return [self.decode(n, c) for n, c in zip(names, codes)]
