"""``lowbit.save`` / ``lowbit.load``: safetensors + JSON, never pickle.

A saved model is a folder with ``lowbit.json`` (format version, recipe, captured input
signature, the spec of every quantized operand, the artifacts' JSON fields, a SHA-256 digest of
every tensor) and ``params.safetensors`` (scales, zero points, timestep tables, integer weights,
the artifacts' tensors). Loading checks the files first, then re-captures the user's model on
inputs of the saved signature, replays the recipe's rewrite passes and converts with the saved
parameters and artifacts, so no code or graph is ever deserialized and no pass that decided
something from calibration runs again. Both files are staged (``lowbit.core.staging``): a failed
save leaves nothing half-written behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY, QuantSpec
from lowbit.ir.artifacts import ARTIFACTS, Artifact, ArtifactError
from lowbit.ir.capture import InputSignature, TensorSpec, capture
from lowbit.ir.params import OperandParams, target_name
from lowbit.passes import PassContext, Pipeline
from lowbit.passes.base import PassError
from lowbit.core.quantized_model import QuantizedModel
from lowbit.recipes import Recipe, RecipeError
from lowbit.core.staging import staged_folder

__all__ = ["FORMAT_VERSION", "SerializationError", "load", "save"]

FORMAT_VERSION = 4  # 2: recipes list their passes; artifacts; a digest of every tensor. 3: "step_arg", dynamic dims, tuples.
# 4: weights of at most 4 bits stored two per byte (lowbit.ir.packed_weights)
_META, _TENSORS = "lowbit.json", "params.safetensors"
_ARTIFACT = "artifact:"
_KEYS = ("model_class", "model_config", "model_weights", "recipe", "step_arg", "signature", "params", "artifacts",
         "digests", "meta_digest")  # tensors of artifact NAME are saved as "artifact:NAME/<field>"
_REFINED = ("granularity", "axis", "groups")  # spec fields that calibration-time passes may set
_TYPES = {"model_class": (str,), "model_config": (dict, type(None)), "model_weights": (str,), "recipe": (dict,),
          "step_arg": (str, type(None)), "signature": (dict,), "params": (dict,), "artifacts": (dict,), "digests": (dict,),
          "meta_digest": (str,)}


class SerializationError(ValueError):
    """A saved model cannot be written or read; the message says why and what to do."""


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, TensorSpec):
        return {"__tensor__": {"shape": list(value.shape), "dtype": value.dtype, "dynamic": list(value.dynamic)}}
    if isinstance(value, dict):
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, tuple):  # kept apart from lists: the input check compares structures
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SerializationError(f"cannot save input {where} of type {type(value).__name__}: only tensors and plain constants are saved")


def _tensor_spec(spec: Any, where: str) -> TensorSpec:
    """A saved tensor input, checked field by field (shape, dtype, dynamic dimensions)."""
    if not isinstance(spec, dict) or set(spec) != {"shape", "dtype", "dynamic"}:
        raise SerializationError(f"{where} should be a table of shape, dtype and dynamic, not {spec!r}")
    shape, dtype, dynamic = spec["shape"], spec["dtype"], spec["dynamic"]
    if not isinstance(shape, list) or not all(d is None or (type(d) is int and d >= 0) for d in shape):
        raise SerializationError(f"{where}: shape {shape!r} is not a list of sizes (null for the batch)")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise SerializationError(f"{where}: dtype {dtype!r} is not a torch dtype")
    if not isinstance(dynamic, list) or not all(type(d) is int and 0 <= d < len(shape) for d in dynamic):
        raise SerializationError(f"{where}: dynamic {dynamic!r} is not a list of dimensions of {shape}")
    return TensorSpec(tuple(shape), dtype, tuple(dynamic))


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return _tensor_spec(value["__tensor__"], where)
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
    if isinstance(value, dict):
        return {k: _decode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _signature(path: Path, meta: dict) -> InputSignature:
    """The captured inputs, refused if building their examples would take more memory than is free:
    a damaged shape must not make ``load`` allocate terabytes."""
    where = f"{path / _META}: signature"
    signature = InputSignature(_decode(meta["signature"], where), meta["step_arg"])
    specs = [(name, s) for name, value in signature.inputs.items() for s in pytree.tree_leaves(value) if isinstance(s, TensorSpec)]
    sizes = [math.prod(2 if d is None else d for d in s.shape) * getattr(torch, s.dtype).itemsize for _, s in specs]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if sum(sizes) > free:
        name, largest = specs[sizes.index(max(sizes))]
        raise SerializationError(f"{where} would allocate {sum(sizes) / 2**30:.1f} GiB of example inputs ({name}: "
                                 f"{largest.describe()}), more than the {free / 2**30:.1f} GiB free; the file is damaged")
    return signature


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _config(model: torch.nn.Module) -> Any:
    """The model's configuration as plain JSON (diffusers models carry one; others have none)."""
    config = getattr(model, "config", None)
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str)) if hasattr(config, "items") else None


def _weights_digest(model: torch.nn.Module) -> str:
    """One digest of every parameter and buffer of the full-precision model, by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """A digest of the JSON record itself, so that a hand-edited shape or spec is refused before use."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_digest"}, sort_keys=True).encode()).hexdigest()


def save(qmodel: QuantizedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``qmodel`` to the folder ``path``: its parameters, its artifacts and the recipe."""
    tensors = {f"{t}/{k}": v.contiguous() for t, p in qmodel.params.items() for k, v in p.tensors().items()}
    artifacts = {}
    for name, artifact in qmodel.artifacts.items():
        artifacts[name], fields = artifact.encode(name)
        tensors |= {f"{_ARTIFACT}{name}/{k}": v.contiguous() for k, v in fields.items()}
    meta = {
        "format": "lowbit",
        "version": FORMAT_VERSION,
        "model_class": type(qmodel.original).__name__,
        "model_config": _config(qmodel.original),
        "model_weights": _weights_digest(qmodel.original),
        "recipe": qmodel.recipe.to_dict(),
        "step_arg": qmodel.step_arg,
        "signature": _encode(qmodel.signature.inputs, "inputs"),
        "params": {t: p.spec.to_dict() for t, p in qmodel.params.items()},
        "artifacts": artifacts,
        "digests": {k: _digest(v) for k, v in tensors.items()},
    }
    meta["meta_digest"] = _meta_digest(meta)
    with staged_folder(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / _TENSORS)
        (tmp / _META).write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_meta(path: Path) -> dict:
    if not (path / _META).is_file() or not (path / _TENSORS).is_file():
        raise SerializationError(f"{path} is not a saved lowbit model (expected {_META} and {_TENSORS} inside)")
    try:
        meta = json.loads((path / _META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SerializationError(f"{path / _META} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != "lowbit":
        raise SerializationError(f"{path / _META} is not a lowbit file")
    if meta.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"{path} was saved in lowbit format version {meta.get('version')}, but this lowbit reads "
            f"version {FORMAT_VERSION}; re-quantize the model, or load it with the lowbit release that saved it"
        )
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise SerializationError(f"{path / _META} lacks {', '.join(missing)}: the file was edited or truncated")
    wrong = [k for k, kind in _TYPES.items() if not isinstance(meta[k], kind)]
    if wrong:
        raise SerializationError(f"{path / _META}: {wrong[0]} is a {type(meta[wrong[0]]).__name__}, where lowbit writes "
                                 f"{' or '.join(t.__name__ for t in _TYPES[wrong[0]])}; the file was not written by this lowbit")
    if meta["meta_digest"] != _meta_digest(meta):
        raise SerializationError(f"{path / _META} differs from what lowbit wrote (its digest does not match): the file "
                                 f"was edited; re-save the model from its source")
    return meta


def _check_model(path: Path, meta: dict, model: torch.nn.Module) -> None:
    """The model given must be the one that was quantized: class, configuration and weights."""
    if meta["model_class"] != type(model).__name__:
        raise SerializationError(f"{path} quantizes a {meta['model_class']}, but the model given is a {type(model).__name__}")
    config = _config(model)
    if config != meta["model_config"]:
        saved = meta["model_config"] or {}
        differ = sorted(k for k in set(saved) | set(config or {}) if saved.get(k) != (config or {}).get(k))
        raise SerializationError(f"{path} quantizes a {meta['model_class']} of another configuration (differs in "
                                 f"{', '.join(differ[:5])}); load it into the model it was quantized from")
    if _weights_digest(model) != meta["model_weights"]:
        raise SerializationError(f"{path} quantizes a {meta['model_class']} with other weights: the full-precision "
                                 f"weights given differ from those it was quantized from; load it into that model")


def _read_tensors(path: Path, digests: dict) -> dict[str, torch.Tensor]:
    """The saved tensors, each checked against the digest recorded when it was saved."""
    try:
        tensors = load_file(path / _TENSORS)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise SerializationError(f"{path / _TENSORS} cannot be read ({err}); the file is damaged or not lowbit's") from err
    if set(tensors) != set(digests):
        extra, missing = sorted(set(tensors) - set(digests))[:3], sorted(set(digests) - set(tensors))[:3]
        raise SerializationError(f"{path / _TENSORS} does not hold the tensors {_META} records (unexpected {extra}, "
                                 f"missing {missing})")
    changed = [k for k, t in tensors.items() if _digest(t) != digests[k]]
    if changed:
        raise SerializationError(f"{path / _TENSORS}: tensor {changed[0]} differs from what was saved"
                                 f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; the file was modified")
    return tensors


def _artifacts(path: Path, records: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Artifact]:
    out = {}
    for name, record in records.items():
        cls = ARTIFACTS.get(record.get("kind")) if isinstance(record, dict) else None
        if cls is None:
            raise SerializationError(f"{path / _META}: artifact {name!r} is of kind {record.get('kind') if isinstance(record, dict) else record!r}, "
                                     f"which this lowbit does not know; import the module that defines it before loading")
        prefix = f"{_ARTIFACT}{name}/"
        fields = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            out[name] = cls.decode(name, record, fields)
        except (ArtifactError, TypeError, ValueError) as err:
            raise SerializationError(f"{path}: {err}") from err
    return out


def _params(path: Path, specs: dict, tensors: dict[str, torch.Tensor]) -> dict[str, OperandParams]:
    """Every operand's saved spec and tensors, each checked (types, dtypes, consistency)."""
    params = {}
    for target, spec in specs.items():
        fields = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == target}
        try:
            params[target] = OperandParams(QuantSpec.from_dict(spec, f"params.{target}"), **fields)
        except (TypeError, ValueError) as err:
            raise SerializationError(f"{path}: the saved parameters of {target} are invalid: {err}") from err
    return params


def _check_spec(path: Path, target: str, saved: QuantSpec, annotated: QuantSpec) -> None:
    """The saved spec may differ from the recipe's only where calibration-time passes refine it
    (grouping sets granularity, axis and groups; an "auto" scheme is decided); bits, scheme, mode or
    symmetry that differ mean the file does not belong to this recipe."""
    refined = _REFINED + (("scheme",) if annotated.scheme == "auto" else ())  # choose_attention_scheme decided it
    differ = [f.name for f in dataclasses.fields(QuantSpec)
              if f.name not in refined and getattr(saved, f.name) != getattr(annotated, f.name)]
    if differ:
        raise SerializationError(f"{path}: the saved spec of {target} differs from what its recipe gives in "
                                 f"{', '.join(f'{k} ({getattr(saved, k)} saved, {getattr(annotated, k)} by the recipe)' for k in differ)}")


def load(path: str | os.PathLike, model: torch.nn.Module) -> QuantizedModel:
    """Rebuild a quantized ``model`` (the same architecture, full-precision weights) from ``path``.

    Everything is read and checked before anything is built, so a refused file leaves no state."""
    path = Path(path)
    meta = _read_meta(path)
    _check_model(path, meta, model)
    tensors = _read_tensors(path, meta["digests"])
    artifacts = _artifacts(path, meta["artifacts"], tensors)
    params = _params(path, meta["params"], tensors)
    try:
        recipe = Recipe.from_dict(meta["recipe"], f"{path / _META} (recipe)")
    except RecipeError as err:
        raise SerializationError(str(err)) from err
    signature = _signature(path, meta)
    gm = capture(model, (), signature.examples(batch=2), step_arg=signature.step_arg)
    ctx = PassContext(precision=recipe.precision, step_arg=signature.step_arg, params=params, artifacts=artifacts)
    gm = Pipeline(recipe.phase_passes("rewrite")).run(gm, ctx)
    expected = set()
    for node in gm.graph.nodes:
        if QUANT_KEY in node.meta:
            annotation = node.meta[QUANT_KEY]
            path_ = node.meta[LAYER_KEY].path
            targets = {op: target_name(path_, op) for op, spec in annotation.operands().items() if spec.mode != "dynamic"}
            expected |= set(targets.values())
            saved = {op: params[t].spec for op, t in targets.items() if t in params}
            for op, spec in saved.items():
                _check_spec(path, targets[op], spec, getattr(annotation, op))
            node.meta[QUANT_KEY] = dataclasses.replace(annotation, **saved)
    if expected != set(params):
        extra, missing = sorted(set(params) - expected)[:3], sorted(expected - set(params))[:3]
        raise SerializationError(f"{path} does not fit this model: saved-only targets {extra}, unsaved targets {missing}")
    convert = Pipeline(recipe.phase_passes("convert"))
    try:
        gm = convert.run(gm, ctx)
    except PassError as err:
        raise SerializationError(f"{path} does not fit this model: {err}") from err
    return QuantizedModel(gm, model, recipe, params, artifacts, signature.step_arg, convert.records)
