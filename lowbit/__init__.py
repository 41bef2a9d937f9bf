"""lowbit: compiler passes that bring text-to-image diffusion and VAR models to 4-8 bits."""

from lowbit.calibration import DenoiserInputStream, record_denoiser_inputs
from lowbit.lowering.onnx_qnn import export_onnx, verify_qnn
from lowbit.quantize import quantize
from lowbit.quantized_model import QuantizedModel
from lowbit.recipes import Recipe, RecipeError, recipes
from lowbit.report import layer_report
from lowbit.serialization import load, save

__all__ = ["DenoiserInputStream", "QuantizedModel", "Recipe", "RecipeError", "layer_report", "load", "quantize", "recipes", "record_denoiser_inputs", "save",
           "export_onnx", "verify_qnn"]
