"""Lowering to a QDQ ONNX model that Qualcomm's QNN compiles entirely for the Hexagon HTP.

One concern per file: ``specialize`` (one timestep, one batch: per-timestep tables and the
timestep embedding become constants), ``aten_ops`` / ``lowbit_ops`` / ``quantizers`` / ``layers``
(the translations), ``emit`` (fx graph to ONNX with lowbit's numerics), ``calibrate`` (ranges of
what lowbit keeps in float), ``legalize`` (the integer-only QDQ graph the HTP runs), ``export``
(the entry points), ``htp`` (sessions), ``placement`` (CPU nodes, float islands), ``verify``,
``context`` (the EPContext binary for the phone) and ``denoiser`` (a sampler's view of the HTP).
"""

from lowbit.lowering.onnx_qnn.context import compile_context
from lowbit.lowering.onnx_qnn.denoiser import HTPDenoiser
from lowbit.lowering.onnx_qnn.errors import LoweringError
from lowbit.lowering.onnx_qnn.export import ExportResult, export_onnx, export_schedule
from lowbit.lowering.onnx_qnn.htp import IOCodec, htp_session
from lowbit.lowering.onnx_qnn.verify import VerifyReport, verify_qnn

__all__ = ["ExportResult", "HTPDenoiser", "IOCodec", "LoweringError", "VerifyReport", "compile_context", "export_onnx",
           "export_schedule", "htp_session", "verify_qnn"]
