"""The reliability issue's probes, run as a new user would: each one either works or is refused by
one line that names the file, field or layer. ``test_probes.py`` asserts this; run

    .venv/bin/python -m tests.reliability.probes

for the table (probe, what it did before the fix, what it does now) that the issue note quotes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch

import lowbit
from lowbit.cli import main
from lowbit.models.tiny import build
from tests.conftest import calibration_set


@dataclass(frozen=True)
class Probe:
    name: str
    before: str
    run: Callable[[Path], str]  # the outcome in one line; raises only for an error that is not lowbit's


LOWBIT_ERRORS = (ValueError, OSError, RuntimeError)  # the bases of every lowbit error class


def refused(call: Callable[[], object]) -> str:
    """The one-line refusal of ``call`` (an AssertionError if it worked or wrote several lines)."""
    try:
        call()
    except LOWBIT_ERRORS as err:
        assert type(err).__module__.startswith("lowbit"), f"{type(err).__module__}.{type(err).__name__}: {err}"
        message = str(err)
        assert "\n" not in message.strip(), message
        return f"refused: {type(err).__name__}: {message}"
    raise AssertionError("it was not refused")


def cli(*argv: str) -> str:
    """Exit status and stderr of the command line; a traceback or several lines fail."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith(("usage:", " "))
             and "%|" not in line]  # argparse's usage, progress bars
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    return f"exit 2: {lines[0]}"


def _quantized(recipe: str = "minmax-w8a8", batch: int = 2):
    model = build("pixart")
    return model, lowbit.quantize(model, recipe, calibration_set("pixart", batch=batch), progress=False)


def _saved(tmp: Path, change: Callable[[dict], None] | None = None) -> tuple[torch.nn.Module, Path]:
    model, qmodel = _quantized()
    lowbit.save(qmodel, tmp / "q")
    if change is not None:
        from lowbit.core.serialization import _meta_digest

        meta = json.loads((tmp / "q" / "lowbit.json").read_text())
        change(meta)
        meta["meta_digest"] = _meta_digest(meta)
        (tmp / "q" / "lowbit.json").write_text(json.dumps(meta))
    return model, tmp / "q"


def _recipe(text: str, *quantize_args: str) -> Callable[[Path], str]:
    """A probe running ``lowbit quantize`` on a recipe file of this text (after name = "r")."""
    def run(tmp: Path) -> str:
        (tmp / "r.toml").write_text('name = "r"\n' + text)
        return cli("quantize", "--recipe", str(tmp / "r.toml"), *quantize_args, "--out", str(tmp / "o"))
    return run


BITS = "weight_bits = 8\nactivation_bits = 8\n"


def _save_into_cwd(tmp: Path) -> str:
    (tmp / "precious.txt").write_text("keep")
    _, qmodel = _quantized()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        outcome = refused(lambda: lowbit.save(qmodel, ".", overwrite=True))
    finally:
        os.chdir(cwd)
    assert (tmp / "precious.txt").read_text() == "keep"
    return outcome + " (nothing deleted)"


def _cli_into_cwd(tmp: Path) -> str:
    (tmp / "precious.txt").write_text("keep")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        outcome = cli("quantize", "--prompts", "1", "--steps", "2", "--samples", "1", "--out", ".", "--overwrite")
    finally:
        os.chdir(cwd)
    assert (tmp / "precious.txt").read_text() == "keep"
    return outcome + " (nothing deleted)"


def _batches(tmp: Path) -> str:
    model, qmodel = _quantized(batch=1)
    lowbit.save(qmodel, tmp / "q")
    loaded = lowbit.load(tmp / "q", model)
    for batch in (2, 5):
        kwargs = calibration_set("pixart", batch=batch)[0][1]
        assert torch.equal(qmodel(**kwargs)[0], loaded(**kwargs)[0])
    return "works: calibrated at batch 1, runs at 2 and 5 before and after save/load, same output"


def _other_weights(tmp: Path) -> str:
    model, path = _saved(tmp)
    with torch.no_grad():
        model.proj_out.weight.add_(1e-3)
    return refused(lambda: lowbit.load(path, model))


def _other_config(tmp: Path) -> str:
    model, path = _saved(tmp)
    return refused(lambda: lowbit.load(path, type(model).from_config({**model.config, "num_layers": 1})))


def _edited_spec(tmp: Path) -> str:
    model, path = _saved(tmp)
    meta = json.loads((path / "lowbit.json").read_text())
    meta["params"][min(meta["params"])]["bits"] = 3
    (path / "lowbit.json").write_text(json.dumps(meta))
    return refused(lambda: lowbit.load(path, model))


def _truncated(tmp: Path) -> str:
    model, path = _saved(tmp)
    data = (path / "params.safetensors").read_bytes()
    (path / "params.safetensors").write_bytes(data[: len(data) // 2])
    return refused(lambda: lowbit.load(path, model))


def _huge_signature(tmp: Path) -> str:
    def grow(meta: dict) -> None:
        spec = next(v["__tensor__"] for v in meta["signature"].values() if isinstance(v, dict) and "__tensor__" in v)
        spec["shape"] = [None, 4096, 4096, 4096]
    model, path = _saved(tmp, grow)
    return refused(lambda: lowbit.load(path, model))


def _json_list(tmp: Path) -> str:
    model, path = _saved(tmp)
    (path / "lowbit.json").write_text("[]")
    return refused(lambda: lowbit.load(path, model))


def _json_without_recipe(tmp: Path) -> str:
    model, path = _saved(tmp, lambda m: m.pop("recipe"))
    return refused(lambda: lowbit.load(path, model))


def _verify_qnn_text(tmp: Path) -> str:
    (tmp / "notes.onnx").write_text("not a model\n")
    return cli("verify-qnn", str(tmp / "notes.onnx"))


def _verify_qnn_empty(tmp: Path) -> str:
    (tmp / "empty.onnx").write_bytes(b"")
    return cli("verify-qnn", str(tmp / "empty.onnx"))


def _manifest_unknown_model(tmp: Path) -> str:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp / "t0.onnx"))
    (tmp / "manifest.json").write_text(json.dumps({"model": "sd9", "graphs": {"0": "t0.onnx"}}))
    return cli("verify-qnn", str(tmp / "t0.onnx"))


def _out_below_file(tmp: Path) -> str:
    (tmp / "results.txt").write_text("keep")
    return cli("quantize", "--out", str(tmp / "results.txt" / "run"))


def _float64_calibration(tmp: Path) -> str:
    samples = [((), {k: v.double() if v.is_floating_point() else v for k, v in kw.items()})
               for _, kw in calibration_set("pixart")]
    return refused(lambda: lowbit.quantize(build("pixart"), "minmax-w8a8", samples, progress=False))


def _plain_compile(tmp: Path) -> str:
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="lowbit")(torch.randn(2, 4))
    message = next(str(w.message) for w in caught if "holds no quantized op" in str(w.message))
    return f"warns: {message}"


def _folder_mode(tmp: Path) -> str:
    _, qmodel = _quantized()
    previous = os.umask(0o022)
    try:
        lowbit.save(qmodel, tmp / "q")
    finally:
        os.umask(previous)
    mode = (tmp / "q").stat().st_mode & 0o777
    assert mode == 0o755, oct(mode)
    return f"works: the saved folder is {oct(mode)} under umask 022"


PROBES = [
    Probe("lowbit.save(q, '.', overwrite=True)", "deleted everything in the current folder, then OSError", _save_into_cwd),
    Probe("lowbit quantize --out . --overwrite", "deleted everything in the current folder, then OSError", _cli_into_cwd),
    Probe("model calibrated at batch 1, run at batch 2 and 5", "AssertionError: Guard failed: hidden_states.size()[0] == 1",
          _batches),
    Probe("load into the same architecture with other weights", "loaded silently, mixed weights (rel. error 0.25)",
          _other_weights),
    Probe("load into another config of the same class", "loaded, failed at the first call with a torch shape error",
          _other_config),
    Probe("load a file whose spec was edited by hand", "loaded, failed at the first call", _edited_spec),
    Probe("load a truncated params.safetensors", "an error naming no path", _truncated),
    Probe("load a JSON whose signature asks for a huge shape", "tried to allocate 32 TB", _huge_signature),
    Probe("load a lowbit.json that is a list", "AttributeError", _json_list),
    Probe("load a lowbit.json without recipe", "KeyError", _json_without_recipe),
    Probe('recipe quantize_attention = "false"', "accepted; attention quantized", _recipe(BITS + 'quantize_attention = "false"')),
    Probe('recipe keep_fp = "transformer_blocks.*"', "split into letters", _recipe(BITS + 'keep_fp = "transformer_blocks.*"')),
    Probe('recipe weight_bits = "8"', "TypeError at quantize time", _recipe('weight_bits = "8"\nactivation_bits = 8\n')),
    Probe('recipe [layers."x"] weight_bits = "eight"', "could not convert string to float, no field or file named",
          _recipe(BITS + '[layers."x"]\nweight_bits = "eight"\n')),
    Probe("a per-layer pattern matching no layer", "PassError traceback",
          _recipe(BITS + '[layers."transformer_blocks.99.*"]\nfloat = true\n', "--prompts", "1", "--steps", "2", "--samples", "1")),
    Probe("lowbit verify-qnn on a text file", "protobuf DecodeError traceback", _verify_qnn_text),
    Probe("lowbit verify-qnn on an empty file", "protobuf DecodeError traceback", _verify_qnn_empty),
    Probe("a manifest naming an unknown model", "KeyError traceback", _manifest_unknown_model),
    Probe("--out below a regular file", "traceback after all the work was done", _out_below_file),
    Probe("lowbit eval --samples 0", "traceback", lambda tmp: cli("eval", "--samples", "0", "--out", str(tmp / "e"))),
    Probe("lowbit quantize --steps 1", "traceback",
          lambda tmp: cli("quantize", "--steps", "1", "--prompts", "1", "--samples", "1", "--out", str(tmp / "o"))),
    Probe("calibration in float64", "Input type (double) and bias type (float) should be the same", _float64_calibration),
    Probe("torch.compile(plain_module, backend='lowbit')", "ran full precision, no warning", _plain_compile),
    Probe("folder permissions of a save", "0700: other users could not read it", _folder_mode),
]


def run(probe: Probe) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return probe.run(Path(tmp))


if __name__ == "__main__":
    rows = ["| probe | before | now |", "| --- | --- | --- |"]
    for probe in PROBES:
        rows.append(f"| {probe.name} | {probe.before} | {run(probe).replace('|', '/')} |")
    print("\n".join(rows))
