"""``lowbit.verify_qnn``: does an exported model run on the phone's HTP, and compute what lowbit computes?

It loads the model on the QNN HTP backend of a Snapdragon SoC (default the 8 Elite: v79, SoC 69)
with CPU fallback disabled; if that fails, it loads it again with fallback allowed to name every
node that would not map (its op, fx node and lowbit layer). A loaded model is checked for HTP float
islands too. Given inputs and lowbit's eager quantized module, it runs both and reports the
relative L2 error; it writes the EPContext model and binary a phone loads.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from lowbit.lowering.onnx_qnn.context import context_path
from lowbit.lowering.onnx_qnn.export import TIMESTEP_KEY
from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC, SOCS, IOCodec, htp_options, htp_session
from lowbit.lowering.onnx_qnn.placement import Misplaced, cpu_nodes, dump_options, float_islands
from lowbit.lowering.onnx_qnn.specialize import flat_inputs

__all__ = ["VerifyReport", "verify_qnn"]


@dataclass
class VerifyReport:
    model: Path
    loaded: bool
    soc: str = DEFAULT_SOC
    misplaced: list[Misplaced] = field(default_factory=list)
    load_error: str | None = None
    relative_error: float | None = None  # ||HTP - reference|| / ||reference||
    context: Path | None = None
    context_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.loaded and not self.misplaced

    def lines(self) -> list[str]:
        arch, soc_model = SOCS[self.soc]
        htp = f"the HTP of {self.soc} (v{arch}, SoC {soc_model})"
        state = f"loads on {htp} with CPU fallback disabled" if self.loaded else f"does NOT load on {htp}"
        out = [f"{self.model}: {state}"]
        if self.load_error and not self.loaded:
            out.append(f"  onnxruntime: {self.load_error.strip().splitlines()[0]}")
        out += [f"  {m.message()}" for m in self.misplaced]
        if self.loaded and not self.misplaced:
            out.append("  every op runs on the HTP on integer grids (no CPU node, no float island)")
        if self.relative_error is not None:
            out.append(f"  relative L2 error against lowbit's eager quantized module: {self.relative_error:.5f}")
        if self.context is not None:
            out.append(f"  EPContext model: {self.context} (context binary {self.context_bytes / 1e6:.2f} MB)")
        return out


def _expected(reference: Any, model: onnx.ModelProto, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The reference's first output: an array as given, or the eager quantized module run on
    ``inputs``, which then holds every placeholder of its graph by name (also those the exported
    graph folded: empty caches, constant position ids), the step taken from the graph's metadata."""
    if isinstance(reference, torch.Tensor):
        return reference.detach().float().numpy()
    if isinstance(reference, np.ndarray):
        return reference.astype(np.float32)
    meta = {p.key: p.value for p in model.metadata_props}
    kwargs = dict(inputs)
    batch = next(v.shape[0] for v in kwargs.values() if v.dim() > 0)
    if meta.get(TIMESTEP_KEY):
        kwargs[reference.step_arg] = torch.full((batch,), float(meta[TIMESTEP_KEY]))
    for name, spec in flat_inputs(reference.graph_module, reference.signature.inputs).items():
        if name not in kwargs:
            raise ValueError(f"the inputs lack the graph input {name!r}: give every input the model was called with")
        if getattr(spec, "dtype", "float32") != "float32":  # integer inputs (masks) go back to their dtype
            kwargs[name] = kwargs[name].to(getattr(torch, spec.dtype))
    gm = reference.graph_module
    leaves = [kwargs[n.name] for n in gm.graph.nodes if n.op == "placeholder"]
    args, nested = pytree.tree_unflatten(leaves, gm.graph._codegen.pytree_info.in_spec)
    with torch.no_grad():
        out = reference(*args, **nested, return_dict=False)  # dropped for the graph; diffusers models return tuples
    return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()


def verify_qnn(model_path: str | Path, inputs: dict[str, Any] | None = None, reference: Any = None, *,
               context_dir: str | Path | None = None, check_float_islands: bool = True, soc: str = DEFAULT_SOC) -> VerifyReport:
    """Load, place, run and compare one exported graph; see the module docstring.

    ``inputs``: float inputs by the model's input names. ``reference``: the eager
    :class:`lowbit.QuantizedModel` (called with ``inputs`` at the graph's timestep) or the expected
    output array. ``context_dir``: where to write ``<model>_ctx.onnx`` and its context binary.
    ``soc``: the phone's SoC (a key of ``SOCS``; default the Snapdragon 8 Elite).
    """
    htp_options(soc)  # an unknown SoC is the caller's error, not the model's
    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ValueError(f"{model_path} is not an ONNX model ({type(err).__name__}); give a graph written by "
                         f"lowbit export --target qnn-htp") from None
    if not model.graph.node:
        raise ValueError(f"{model_path} holds no graph (an empty or truncated file?); give a graph written by "
                         f"lowbit export --target qnn-htp")
    report = VerifyReport(model_path, loaded=False, soc=soc)
    target = context_path(model_path, context_dir) if context_dir is not None else None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as dump:
        try:
            session = htp_session(model_path, soc=soc, context_path=target,
                                  extra_options=dump_options(dump) if check_float_islands else None)
        except Exception as err:  # onnxruntime raises its own Fail / EPFail types
            report.load_error = str(err)
            report.misplaced = cpu_nodes(model_path, soc)
            return report
        report.loaded = True
        if check_float_islands:
            report.misplaced = float_islands(model_path, dump, soc)
    if target is not None:
        report.context = target
        report.context_bytes = sum(p.stat().st_size for p in target.parent.glob(f"{target.stem}*.bin"))
    if inputs is not None:
        inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
        graph_inputs = {i.name for i in model.graph.input}
        feeds = {k: v.float().numpy() for k, v in inputs.items() if k in graph_inputs}
        got = IOCodec.of(model).run(session, feeds)[0]
        if reference is not None:
            want = _expected(reference, model, inputs)
            report.relative_error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return report
