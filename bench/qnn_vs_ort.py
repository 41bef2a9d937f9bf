"""lowbit's QNN HTP export against onnxruntime's own QNN path, on the same FP reference model.

Both start from the shipped reference model at one timestep of its 25-step schedule and a batch
of one prompt pair (classifier-free guidance), calibrated on the same sampler inputs:

- onnxruntime's path: the FP graph as ONNX (lowbit's emitter on the full-precision graph, so the
  graph, the folded timestep and the static shapes are the same as lowbit's), then
  ``qnn_preprocess_model``, ``get_qnn_qdq_config`` (per-channel weights) and
  ``onnxruntime.quantization.quantize`` at uint8 and at uint16 activations;
- lowbit: ``lowbit.export_onnx`` of the model quantized with each recipe.

For every model: nodes left to the CPU (a session with fallback allowed), HTP ops that run in
float, relative L2 error of the HTP's output against the FP PyTorch model on held-out sampler
inputs (another prompt, the same timestep), and the size of its compiled QNN context binary next
to the fp16 model's size (2 bytes per parameter). Writes bench/results/qnn_vs_ort.md.

    .venv/bin/python bench/qnn_vs_ort.py [--recipes minmax-w8a8 minmax-w8a16 dgq-w8a8] [--step 12]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

import lowbit
from lowbit.evaluation.run import calibrate_reference
from lowbit.ir.capture import capture, normalize_inputs
from lowbit.lowering.onnx_qnn import compile_context, htp_session
from lowbit.lowering.onnx_qnn.emit import emit
from lowbit.lowering.onnx_qnn.htp import IOCodec
from lowbit.lowering.onnx_qnn.placement import cpu_nodes, float_islands
from lowbit.lowering.onnx_qnn.specialize import specialize
from lowbit.models.reference import load_reference_model
from lowbit.passes.base import PassContext
from lowbit.passes.canonicalize_attention import CanonicalizeAttention
from lowbit.evaluation.qnn import cfg_examples

INPUTS = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask")


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _pairs(kwargs: dict) -> list[dict]:
    """A CFG batch [uncond x n; cond x n] as n batches of one (uncond, cond) pair."""
    half = kwargs["hidden_states"].shape[0] // 2
    return [{k: torch.stack([kwargs[k][i], kwargs[k][half + i]]) for k in INPUTS} for i in range(half)]


def _feeds(kwargs: dict) -> dict[str, np.ndarray]:
    return {k: kwargs[k].float().numpy() for k in INPUTS}


def _fp_onnx(model, kwargs: dict, path: Path) -> None:
    """The full-precision graph at this timestep and batch, as plain float ONNX."""
    gm = capture(model, (), kwargs)
    gm = CanonicalizeAttention().run(gm, PassContext(step_arg="timestep")).graph_module
    onnx.save(emit(specialize(gm, normalize_inputs(model, (), kwargs, "timestep"), "timestep"), "fp"), str(path))


def _ort_qnn(fp_path: Path, feeds: list[dict], activation: QuantType, path: Path) -> None:
    pre = path.with_suffix(".pre.onnx")
    if not qnn_preprocess_model(str(fp_path), str(pre)):  # writes a file only when it changed the graph
        pre = fp_path
    config = get_qnn_qdq_config(str(pre), _Reader(feeds), activation_type=activation, weight_type=QuantType.QUInt8,
                                per_channel=True)
    quantize(str(pre), str(path), config)


def _run(path: Path, feeds: dict, integer_io: bool) -> np.ndarray | None:
    try:
        session = htp_session(path, cpu_fallback=True)
    except Exception:  # noqa: BLE001 — a model the HTP cannot even compile with fallback is reported as such
        return None
    if integer_io:
        return IOCodec.of(path).run(session, feeds)[0]
    return session.run(None, feeds)[0]


def _row(name: str, path: Path, feeds: dict, fp: np.ndarray, integer_io: bool, fp16_bytes: int, tmp: Path) -> str:
    cpu = cpu_nodes(path)
    try:
        htp_session(path)  # no fallback: does it load as a phone build would?
        loads, islands = "yes", len(float_islands(path))
        compile_context([path], tmp / path.stem)
        size = sum(p.stat().st_size for p in (tmp / path.stem).glob("*.bin")) / 1e6
        size_cell = f"{size:.2f} ({size * 1e6 / fp16_bytes:.2f}x)"
    except Exception:  # noqa: BLE001
        loads, islands, size_cell = "no", "–", "–"
    out = _run(path, feeds, integer_io)
    error = f"{np.linalg.norm(out - fp) / np.linalg.norm(fp):.4f}" if out is not None else "–"
    ops = sorted({m.op for m in cpu})
    return f"| {name} | {len(cpu)}{' (' + ', '.join(ops) + ')' if ops else ''} | {loads} | {islands} | {error} | {size_cell} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["minmax-w8a8", "minmax-w8a16", "dgq-w8a8"])
    parser.add_argument("--prompts", type=int, default=16, help="calibration prompts")
    parser.add_argument("--step", type=int, default=12, help="which of the 25 sampling steps")
    args = parser.parse_args()
    model = load_reference_model()
    calibration = calibrate_reference(model, args.prompts, 25, progress=False)
    held_out = calibrate_reference(model, 2, 25, progress=False)  # other prompts and noise, same schedule
    example = list(cfg_examples(calibration, 2).values())[args.step]
    test = list(cfg_examples(held_out, 2).values())[args.step]
    t = float(example["timestep"][0])
    calib_feeds = [_feeds(pair) for _, k in calibration if float(k["timestep"][0]) == t for pair in _pairs(k)]
    with torch.no_grad():
        fp = model(**test, return_dict=False)[0].numpy()
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    lines = ["| model | nodes on the CPU | loads with CPU fallback disabled | HTP float ops | relative error vs FP | "
             "context binary, MB (x fp16 model) |", "| --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp_path = tmp / "fp.onnx"
        _fp_onnx(model, example, fp_path)
        for label, qtype in (("onnxruntime QNN path, uint8 activations", QuantType.QUInt8),
                             ("onnxruntime QNN path, uint16 activations", QuantType.QUInt16)):
            path = tmp / f"ort_{qtype.name}.onnx"
            _ort_qnn(fp_path, calib_feeds, qtype, path)
            lines.append(_row(label, path, _feeds(test), fp, False, fp16_bytes, tmp))
            print(lines[-1], flush=True)
        for recipe in args.recipes:
            qmodel = lowbit.quantize(model, recipe, calibration, progress=False)
            path = tmp / f"lowbit_{recipe}.onnx"
            lowbit.export_onnx(qmodel, (), example, path, calibration=calibration)
            lines.append(_row(f"lowbit {recipe}", path, _feeds(test), fp, True, fp16_bytes, tmp))
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    header = (f"Made by `.venv/bin/python bench/qnn_vs_ort.py --recipes {' '.join(args.recipes)} --prompts {args.prompts} "
              f"--step {args.step}` (timestep {t:g}, batch 2, {args.prompts} calibration prompts; fp16 model "
              f"{fp16_bytes / 1e6:.2f} MB).\n\n")
    print(text)
    (Path(__file__).parent / "results" / "qnn_vs_ort.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
