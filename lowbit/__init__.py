"""lowbit: compiler passes that bring text-to-image diffusion and VAR models to 4-8 bits.

The public API. The ONNX / QNN functions load onnx and onnxruntime when first used, so that
``import lowbit`` stays light.
"""

from lowbit.core.calibration import DenoiserInputStream, record_denoiser_inputs
from lowbit.core.qat import QATModel, convert_qat, prepare_qat
from lowbit.core.quantize import quantize
from lowbit.core.quantized_model import QuantizedModel
from lowbit.core.serialization import load, save
from lowbit.recipes import Recipe, RecipeError, recipes
from lowbit.reports.layer_report import layer_report
from lowbit.reports.mixed_precision import mixed_precision
from lowbit.reports.sensitivity import sensitivity

__all__ = ["DenoiserInputStream", "QATModel", "QuantizedModel", "Recipe", "RecipeError", "convert_qat", "export_onnx",
           "layer_report", "load", "mixed_precision", "prepare_qat", "quantize", "recipes", "record_denoiser_inputs", "save",
           "sensitivity", "verify_qnn"]

_LAZY = {"export_onnx", "verify_qnn"}


def __getattr__(name: str):
    if name in _LAZY:
        from lowbit.lowering import onnx_qnn

        return getattr(onnx_qnn, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
