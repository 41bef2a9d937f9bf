"""Typed artifacts: what a pass decided, beyond per-operand quantization parameters.

Attention windows, the layers that share attention across CFG, learned bit-widths: each kind is
a frozen dataclass subclassing :class:`Artifact`, with a ``KIND`` (its registered name) and a
``VERSION``. Its tensor fields go to safetensors and every other field to JSON, so a saved model
holds no code; ``lowbit.load`` decodes them into the pass context without re-running the pass
that made them. A file written by another version of a kind is handed to ``upgrade``, which
converts it or refuses with a message that says which version and what to do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor

__all__ = ["ARTIFACTS", "Artifact", "ArtifactError"]

ARTIFACTS: dict[str, type["Artifact"]] = {}  # KIND -> class, filled as subclasses are defined


class ArtifactError(ValueError):
    """An artifact cannot be saved or restored; the message names it and says what to do."""


def _plain(value: Any, where: str) -> Any:
    """A JSON value (tuples become lists); anything else is a programming error worth naming."""
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ArtifactError(f"{where}: a {type(value).__name__} can be neither JSON nor a tensor field")


def _frozen(value: Any) -> Any:
    """JSON lists back to tuples, so a decoded artifact equals the one that was saved."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Base of the artifact kinds: subclasses are frozen dataclasses and set ``KIND`` and ``VERSION``."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "KIND" in cls.__dict__:
            known = ARTIFACTS.get(cls.KIND)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(f"two artifact kinds are named {cls.KIND!r}: {known.__qualname__} and {cls.__qualname__}")
            ARTIFACTS[cls.KIND] = cls

    def encode(self, name: str) -> tuple[dict, dict[str, Tensor]]:
        """(JSON record, tensors by field name) of this artifact."""
        data, tensors = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                tensors[f.name] = value
            else:
                data[f.name] = _plain(value, f"artifact {name!r}.{f.name}")
        return {"kind": self.KIND, "version": self.VERSION, "data": data, "tensors": sorted(tensors)}, tensors

    @classmethod
    def decode(cls, name: str, record: dict, tensors: dict[str, Tensor]) -> "Artifact":
        """The artifact saved as ``record`` (from :meth:`encode`) with its ``tensors``."""
        version = record.get("version")
        if version != cls.VERSION:
            return cls.upgrade(name, version, record.get("data", {}), tensors)
        data = {k: _frozen(v) for k, v in record.get("data", {}).items()}
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(data) | set(tensors) != expected:
            raise ArtifactError(f"artifact {name!r} ({cls.KIND}) has fields {sorted(set(data) | set(tensors))}, "
                                f"expected {sorted(expected)}: the file was edited or written by other code")
        return cls(**data, **tensors)

    @classmethod
    def upgrade(cls, name: str, version: Any, data: dict, tensors: dict[str, Tensor]) -> "Artifact":
        """Convert an artifact of another version; by default, refuse with what to do."""
        raise ArtifactError(f"artifact {name!r} is {cls.KIND} version {version}, but this lowbit reads version "
                            f"{cls.VERSION}; re-quantize the model with this lowbit, or load it with the release that saved it")
