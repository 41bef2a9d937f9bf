"""``lowbit.export_onnx``: a quantized model as the QDQ ONNX graph the QNN HTP runs.

One graph per timestep: the quantized graph is specialized to the example inputs' timestep
(its per-timestep scales and its timestep embedding become constants, specialize.py), emitted
with lowbit's numerics (emit.py), its full-precision tensors measured on the calibration inputs of
that timestep (calibrate.py) and made an integer-only QDQ graph (legalize.py).
``export_schedule`` writes the graphs of a whole sampling schedule into one folder with a
manifest; ``compile_context`` (context.py) compiles them into one context binary whose weights
QNN stores once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from lowbit.ir.capture import normalize_inputs
from lowbit.ir.schema import DynamicParams, schema_class
from lowbit.lowering.onnx_qnn.calibrate import tensor_ranges
from lowbit.lowering.onnx_qnn.emit import emit
from lowbit.lowering.onnx_qnn.htp import IOCodec
from lowbit.lowering.onnx_qnn.legalize import legalize
from lowbit.lowering.onnx_qnn.specialize import flat_inputs, layer_of, specialize

__all__ = ["MANIFEST", "TARGETS", "ExportResult", "export_onnx", "export_schedule", "graph_name"]

TARGETS = ("qnn-htp",)
MANIFEST = "manifest.json"
TIMESTEP_KEY, INPUTS_KEY, RECIPE_KEY = "lowbit.timestep", "lowbit.inputs", "lowbit.recipe"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    timestep: float | None
    batch: int
    nodes: int
    bytes: int
    calibration_batches: int


def graph_name(timestep: float | None) -> str:
    return "model.onnx" if timestep is None else f"t{timestep:g}.onnx"


def _timestep(sample: dict, step_arg: str | None) -> float | None:
    if step_arg is None or step_arg not in sample:
        return None
    return float(torch.as_tensor(sample[step_arg]).reshape(-1)[0])


def _batched(qmodel, inputs: dict, calibration: Iterable | None, timestep: float | None,
             runtime: Iterable[str]) -> list[dict[str, np.ndarray]]:
    """The example plus the calibration samples of the nearest calibrated timestep, in batches of the
    example's size (the HTP graph's batch is static), as float arrays of the ``runtime`` inputs."""
    gm, arg = qmodel.graph_module, qmodel.step_arg
    example = flat_inputs(gm, inputs)
    batch = next(v.shape[0] for v in example.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    samples = [normalize_inputs(qmodel.original, a, k, arg) for a, k in (calibration or [])]
    if samples and timestep is not None:
        steps = np.array([_timestep(s, arg) for s in samples])
        nearest = steps[np.argmin(np.abs(steps - timestep))]
        samples = [s for s, t in zip(samples, steps) if t == nearest]
    specs = flat_inputs(gm, qmodel.signature.inputs)
    batched = {k for k, spec in specs.items() if getattr(spec, "shape", (0,))[:1] == (None,)}
    rows = {k: torch.cat([flat_inputs(gm, s)[k] for s in samples]) for k in batched} if samples else {}
    feeds = [example]
    total = next(iter(rows.values())).shape[0] if rows else 0
    for start in range(0, total - batch + 1, batch):
        feeds.append({k: rows[k][start:start + batch] if k in rows else v for k, v in example.items()})
    return [{k: f[k].float().numpy() for k in runtime} for f in feeds]


def export_onnx(qmodel, args: tuple = (), kwargs: dict[str, Any] | None = None, path: str | Path = "model.onnx",
                target: str = "qnn-htp", *, calibration: Iterable | None = None, fp_weight_bits: int = 16) -> ExportResult:
    """Write ``qmodel`` (a :class:`lowbit.QuantizedModel`) as a QDQ ONNX model for ``target``.

    ``args``/``kwargs`` are example inputs for ``qmodel.forward``: they fix the static batch size
    and the timestep the graph serves. ``calibration`` (the samples given to ``lowbit.quantize``)
    sets the 16-bit ranges of the tensors lowbit keeps in full precision; without it the example
    alone does. ``fp_weight_bits``: the weight width of the layers kept in full precision (16; 8 for
    an HTP without 16-bit weights: ``htp.float_weight_bits(soc)``). The graph's inputs and outputs are
    integer tensors: see ``IOCodec``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; supported: {', '.join(TARGETS)}")
    dynamic = sorted({layer_of(n) for n in qmodel.graph_module.graph.nodes if schema_class(n) is DynamicParams})
    if dynamic:
        raise ValueError(f"recipe {qmodel.recipe.name!r} quantizes activations dynamically (ranges taken at run time, "
                         f"LiteVAR's form) in {len(dynamic)} layers, e.g. {dynamic[0]}; the HTP has no dynamic quantization. "
                         f"Export the static form: the same bit-widths with activation_mode = \"per_step\" (one range per "
                         f"step, calibrated), e.g. minmax-w{qmodel.recipe.precision.weight_bits:g}a{qmodel.recipe.precision.activation_bits:g}")
    inputs = normalize_inputs(qmodel.original, args, kwargs or {}, qmodel.step_arg)
    qmodel.signature.check(inputs, "export_onnx example")
    specs = flat_inputs(qmodel.graph_module, qmodel.signature.inputs)
    unbatched = frozenset(k for k, s in specs.items() if getattr(s, "shape", (None,))[:1] != (None,))
    spec = specialize(qmodel.graph_module, inputs, qmodel.step_arg, unbatched)
    batch = next(v.shape[0] for v in spec.inputs.values() if v.dim() > 0)
    metadata = {TIMESTEP_KEY: "" if spec.timestep is None else f"{spec.timestep:g}", RECIPE_KEY: qmodel.recipe.name,
                INPUTS_KEY: json.dumps({k: list(v.shape) for k, v in spec.inputs.items()})}
    model = emit(spec, type(qmodel.original).__name__, metadata)
    feeds = _batched(qmodel, inputs, calibration, spec.timestep, spec.inputs)
    model = legalize(model, tensor_ranges(model, feeds), fp_weight_bits=fp_weight_bits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return ExportResult(path, spec.timestep, batch, len(model.graph.node), path.stat().st_size, len(feeds))


def export_schedule(qmodel, examples: dict[float, dict[str, Any]], folder: str | Path, *, calibration: Iterable | None = None,
                    fp_weight_bits: int = 16, progress: bool = True) -> list[ExportResult]:
    """One graph per step of a sampling schedule, each for its own example keyword inputs
    (``examples``: step -> inputs at that step; a VAR scale's token count and cache length are its
    own), and ``manifest.json`` mapping steps to files and to the integer grids of each graph's
    inputs and outputs (what a phone app quantizes with)."""
    folder = Path(folder)
    calibration = list(calibration or [])
    results = []
    for t, kwargs in tqdm(list(examples.items()), desc="exporting HTP graphs", unit="graph", disable=not progress, leave=False):
        kw = dict(kwargs)
        kw[qmodel.step_arg] = torch.full_like(torch.as_tensor(kwargs[qmodel.step_arg], dtype=torch.float32).reshape(-1), float(t))
        results.append(export_onnx(qmodel, (), kw, folder / graph_name(float(t)), calibration=calibration,
                                   fp_weight_bits=fp_weight_bits))
    manifest = {"target": "qnn-htp", "recipe": qmodel.recipe.name, "batch": results[0].batch, "step_arg": qmodel.step_arg,
                "graphs": {f"{r.timestep:g}": r.path.name for r in results},
                "io": {f"{r.timestep:g}": IOCodec.of(r.path).grids for r in results}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return results
