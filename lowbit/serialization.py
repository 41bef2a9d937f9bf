"""``lowbit.save`` / ``lowbit.load``: safetensors + JSON, never pickle.

A saved model is a folder with ``lowbit.json`` (format version, recipe, captured input
signature, the spec of every quantized operand) and ``params.safetensors`` (scales, zero
points, timestep tables, integer weights). Loading re-captures the user's model on inputs of the
saved signature, replays the recipe's structure passes and converts with the saved parameters,
so no code or graph is ever deserialized. Both files are staged (``lowbit.staging``): a failed
save leaves nothing half-written behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.ir.annotations import QUANT_KEY, LAYER_KEY, QuantSpec
from lowbit.ir.capture import InputSignature, TensorSpec, capture
from lowbit.ir.params import OperandParams, target_name
from lowbit.passes.base import PassContext
from lowbit.passes.convert_to_quantized_ops import ConvertToQuantizedOps
from lowbit.passes.pipeline import Pipeline
from lowbit.quantized_model import QuantizedModel
from lowbit.recipes import Recipe
from lowbit.staging import staged_folder

__all__ = ["FORMAT_VERSION", "SerializationError", "load", "save"]

FORMAT_VERSION = 1
_META, _TENSORS = "lowbit.json", "params.safetensors"


class SerializationError(ValueError):
    """A saved model cannot be written or read; the message says why and what to do."""


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, TensorSpec):
        return {"__tensor__": {"shape": list(value.shape), "dtype": value.dtype}}
    if isinstance(value, dict):
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SerializationError(f"cannot save input {where} of type {type(value).__name__}: only tensors and plain constants are saved")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return TensorSpec(tuple(value["__tensor__"]["shape"]), value["__tensor__"]["dtype"])
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def save(qmodel: QuantizedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``qmodel`` to the folder ``path``."""
    meta = {
        "format": "lowbit",
        "version": FORMAT_VERSION,
        "model_class": type(qmodel.original).__name__,
        "recipe": qmodel.recipe.to_dict(),
        "timestep_arg": qmodel.timestep_arg,
        "signature": _encode(qmodel.signature.inputs, "inputs"),
        "params": {t: p.spec.to_dict() for t, p in qmodel.params.items()},
    }
    tensors = {f"{t}/{k}": v.contiguous() for t, p in qmodel.params.items() for k, v in p.tensors().items()}
    with staged_folder(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / _TENSORS)
        (tmp / _META).write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_meta(path: Path) -> dict:
    if not (path / _META).is_file() or not (path / _TENSORS).is_file():
        raise SerializationError(f"{path} is not a saved lowbit model (expected {_META} and {_TENSORS} inside)")
    try:
        meta = json.loads((path / _META).read_text())
    except json.JSONDecodeError as err:
        raise SerializationError(f"{path / _META} is not valid JSON: {err}") from err
    if meta.get("format") != "lowbit":
        raise SerializationError(f"{path / _META} is not a lowbit file (format {meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"{path} was saved in lowbit format version {meta.get('version')}, but this lowbit reads "
            f"version {FORMAT_VERSION}; re-quantize the model, or load it with the lowbit release that saved it"
        )
    return meta


def load(path: str | os.PathLike, model: torch.nn.Module) -> QuantizedModel:
    """Rebuild a quantized ``model`` (the same architecture, full-precision weights) from ``path``."""
    path = Path(path)
    meta = _read_meta(path)
    if meta["model_class"] != type(model).__name__:
        raise SerializationError(f"{path} quantizes a {meta['model_class']}, but the model given is a {type(model).__name__}")
    tensors = load_file(path / _TENSORS)
    params = {}
    for target, spec in meta["params"].items():
        fields = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == target}
        params[target] = OperandParams(QuantSpec.from_dict(spec), **fields)
    recipe = Recipe.from_dict(meta["recipe"])
    signature = InputSignature(_decode(meta["signature"]), meta["timestep_arg"])
    gm = capture(model, (), signature.examples(batch=2), timestep_arg=signature.timestep_arg)
    ctx = PassContext(timestep_arg=signature.timestep_arg, params=params)
    gm = Pipeline(recipe.structure_passes()).run(gm, ctx)
    expected = set()
    for node in gm.graph.nodes:
        if QUANT_KEY in node.meta:
            annotation = node.meta[QUANT_KEY]
            path_ = node.meta[LAYER_KEY].path
            targets = {op: target_name(path_, op) for op, spec in annotation.operands().items() if spec.mode != "dynamic"}
            expected |= set(targets.values())
            # calibration-time passes (grouping) refined some specs: the saved ones are authoritative
            saved = {op: params[t].spec for op, t in targets.items() if t in params}
            node.meta[QUANT_KEY] = dataclasses.replace(annotation, **saved)
    if expected != set(params):
        extra, missing = sorted(set(params) - expected)[:3], sorted(expected - set(params))[:3]
        raise SerializationError(f"{path} does not fit this model: saved-only targets {extra}, unsaved targets {missing}")
    convert = Pipeline([ConvertToQuantizedOps()])
    gm = convert.run(gm, ctx)
    return QuantizedModel(gm, model, recipe, params, signature.timestep_arg, convert.records)
