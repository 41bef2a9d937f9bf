"""Fault injection on saved models: every file of a save, corrupted in every way we know of, is
refused by ``lowbit.load`` with a SerializationError that names the path and what is wrong, before
anything is built; the model given is left untouched.

Two kinds of JSON edit are made: by hand (the file's own digest then no longer matches, which is
the first refusal), and "re-digested", as a buggy or foreign writer would leave it, so that the
checks behind the digest are exercised too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.core import serialization
from lowbit.core.serialization import SerializationError
from lowbit.models.tiny import build
from tests.conftest import calibration_set

META, TENSORS = "lowbit.json", "params.safetensors"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """One saved PixArt W8A8 model (and a W4A8 one of the same model, for swapped files)."""
    model, samples = build("pixart"), calibration_set("pixart")
    root = tmp_path_factory.mktemp("saved")
    for recipe in ("minmax-w8a8", "minmax-w4a8"):
        lowbit.save(lowbit.quantize(model, recipe, samples, progress=False), root / recipe)
    return model, root


@pytest.fixture
def copy(original, tmp_path):
    model, root = original
    for folder in root.iterdir():
        shutil.copytree(folder, tmp_path / folder.name)
    return model, tmp_path / "minmax-w8a8"


def _json(change: Callable[[dict], object], redigest: bool = True) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        meta = json.loads((path / META).read_text())
        change(meta)
        if redigest and isinstance(meta, dict):
            meta["meta_digest"] = serialization._meta_digest(meta)
        (path / META).write_text(json.dumps(meta))
    return corrupt


def _bytes(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        (path / name).write_bytes(edit((path / name).read_bytes()))
    return corrupt


def _flip(at: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        out = bytearray(data)
        out[at(data)] ^= 0x5A
        return bytes(out)
    return edit


def _tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrite the tensors and record their digests, as a writer that meant it would."""
    def corrupt(path: Path) -> None:
        tensors = load_file(path / TENSORS)
        change(tensors)
        save_file(tensors, path / TENSORS)
        _json(lambda m: m.update(digests={k: serialization._digest(v) for k, v in tensors.items()}))(path)
    return corrupt


def _first_param(meta: dict) -> dict:
    return meta["params"][min(meta["params"])]


def _first_tensor_spec(meta: dict) -> dict:
    return next(v["__tensor__"] for v in meta["signature"].values() if isinstance(v, dict) and "__tensor__" in v)


def _scale_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("/scale"))


def _swap_tensors(path: Path) -> None:
    shutil.copy(path.parent / "minmax-w4a8" / TENSORS, path / TENSORS)


FAULTS = {
    # the JSON record
    "json missing": (lambda p: (p / META).unlink(), "is not a saved lowbit model"),
    "json empty": (_bytes(META, lambda d: b""), "is not valid JSON"),
    "json truncated": (_bytes(META, lambda d: d[: len(d) // 2]), "is not valid JSON"),
    "json binary": (_bytes(META, lambda d: bytes(range(256)) * 4), "is not valid JSON"),
    "json byte flipped": (_bytes(META, _flip(lambda d: d.index(b'"digests"') + 40)), "digest does not match|not valid JSON"),
    "json a list": (_bytes(META, lambda d: b"[]"), "is not a lowbit file"),
    "json an empty table": (_bytes(META, lambda d: b"{}"), "is not a lowbit file"),
    "json another format": (_json(lambda m: m.update(format="onnx")), "is not a lowbit file"),
    "json other version": (_json(lambda m: m.update(version=99)), "saved in lowbit format version 99, but this lowbit reads"),
    "json hand-edited": (_json(lambda m: _first_param(m).update(bits=3), redigest=False), "digest does not match"),
    **{f"json lacks {key}": (_json(lambda m, key=key: m.pop(key), redigest=key != "meta_digest"), f"lacks {key}")
       for key in serialization._KEYS},
    # re-digested JSON with values of the wrong type or size
    "params a string": (_json(lambda m: m.update(params="all")), "params is a str"),
    "param spec a list": (_json(lambda m: m["params"].update({min(m["params"]): [8]})), "params"),
    "param bits a word": (_json(lambda m: _first_param(m).update(bits="eight")), "bits"),
    "param spec field missing": (_json(lambda m: _first_param(m).pop("bits")), "bits"),
    "param bits edited": (_json(lambda m: _first_param(m).update(bits=3)), r"differs from what its recipe gives in bits \(3.0 saved, 8.0 by the recipe\)"),
    "recipe bits a string": (_json(lambda m: m["recipe"].update(weight_bits="8")), "weight_bits = '8' must be a number"),
    "recipe a number": (_json(lambda m: m.update(recipe=8)), "recipe is a int, where lowbit writes dict"),
    "signature a list": (_json(lambda m: m.update(signature=[])), "signature is a list"),
    "signature dtype unknown": (_json(lambda m: _first_tensor_spec(m).update(dtype="float128")), "float128"),
    "signature shape a word": (_json(lambda m: _first_tensor_spec(m).update(shape="big")), "shape"),
    "signature huge": (_json(lambda m: _first_tensor_spec(m).update(shape=[2, 10**7, 10**7])), "would allocate"),
    "digests a list": (_json(lambda m: m.update(digests=[])), "digests is a list"),
    "artifacts a list": (_json(lambda m: m.update(artifacts=[])), "artifacts is a list"),
    "step_arg a number": (_json(lambda m: m.update(step_arg=3)), "step_arg is a int"),
    # the tensors
    "tensors missing": (lambda p: (p / TENSORS).unlink(), "is not a saved lowbit model"),
    "tensors empty": (_bytes(TENSORS, lambda d: b""), "cannot be read"),
    "tensors truncated": (_bytes(TENSORS, lambda d: d[: len(d) // 2]), "cannot be read"),
    "tensors header flipped": (_bytes(TENSORS, _flip(lambda d: 12)), "cannot be read|differs from what was saved|does not hold"),
    "tensor data flipped": (_bytes(TENSORS, _flip(lambda d: len(d) - 3)), "differs from what was saved; the file was modified"),
    "tensors of another save": (_swap_tensors, "does not hold the tensors|differs from what was saved"),
    "tensor of another dtype": (_tensors(lambda t: t.update({_scale_key(t): t[_scale_key(t)].double()})), "float64"),
    "tensor of another shape": (_tensors(lambda t: t.update({_scale_key(t): torch.cat([t[_scale_key(t)]] * 2)})), "shape"),
    "tensor dropped": (_tensors(lambda t: t.pop(_scale_key(t))), "scale"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_every_corruption_is_refused_by_name(copy, fault):
    model, path = copy
    corrupt, message = FAULTS[fault]
    corrupt(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError, match=message) as refusal:
        lowbit.load(path, model)
    assert str(path) in str(refusal.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_untouched_copy_loads(copy):
    """The faults above are the only reason for the refusals: the same copy, unchanged, loads."""
    model, path = copy
    lowbit.load(path, model)


def test_other_weights_config_or_class_are_refused(copy):
    model, path = copy
    other = build("pixart")
    with torch.no_grad():
        other.proj_out.weight.add_(1e-3)
    with pytest.raises(SerializationError, match="with other weights: the full-precision weights given differ"):
        lowbit.load(path, other)
    wider = type(model).from_config({**model.config, "num_layers": 1})
    with pytest.raises(SerializationError, match=r"of another configuration \(differs in num_layers\)"):
        lowbit.load(path, wider)
    with pytest.raises(SerializationError, match="quantizes a PixArtTransformer2DModel, but the model given is a Sana"):
        lowbit.load(path, build("sana"))
