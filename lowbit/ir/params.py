"""Quantization parameters of one operand, as chosen from calibration statistics.

They are kept apart from the graph, keyed by "<layer path>:<operand>", so that a saved model
is just these tensors plus their specs: loading re-captures the model and replays them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.ir.annotations import QuantSpec
from lowbit.ir.ops import asymmetric_params
from lowbit.ir.packed_weights import PACKED_DTYPE, integer_codes, pack_int4, packable, unpacked_shape

__all__ = ["PARAMS", "OperandParams", "asymmetric", "target_name"]

# The submodule of a quantized graph that holds every quantization-parameter buffer.
PARAMS = "lowbit_params"


def target_name(layer: str, operand: str) -> str:
    return f"{layer}:{operand}"


def asymmetric(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``spec``'s grid over [lo, hi] (held to contain 0)."""
    return asymmetric_params(lo, hi, spec.qmin, spec.qmax)


@dataclass
class OperandParams:
    """Scale and zero point of an operand, already shaped to broadcast against it.

    Per-timestep parameters carry one row per calibrated timestep (``timesteps`` lists them);
    a weight carries its integer values in ``qvalues``: two per byte at 4 bits and below
    (``lowbit.ir.packed_weights``; what every target then keeps in memory), int8 up to 8 bits, int16
    above (``weight_storage`` makes them).
    """

    spec: QuantSpec
    scale: Tensor
    zero_point: Tensor
    timesteps: Tensor | None = None
    qvalues: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("scale", "zero_point", "timesteps"):
            value = getattr(self, name)
            if value is not None and value.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {value.dtype}")
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"scale {tuple(self.scale.shape)} and zero point {tuple(self.zero_point.shape)} differ in shape")
        if self.spec.mode == "per_step":
            if self.timesteps is None or self.timesteps.dim() != 1 or self.scale.shape[0] != self.timesteps.numel():
                raise ValueError("per-timestep parameters need one scale row per calibrated timestep")
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            raise ValueError("scales must be finite and positive")
        if self.qvalues is not None:
            want = PACKED_DTYPE if packable(self.spec.bits, unpacked_shape(self.qvalues)) else self._code_dtype(self.spec)
            if self.qvalues.dtype != want:
                raise ValueError(f"{self.spec.bits:g}-bit integer weights of shape {unpacked_shape(self.qvalues)} are stored "
                                 f"as {want}, got {self.qvalues.dtype}")

    def check_fits(self, operand: torch.Size) -> None:
        """ValueError unless these parameters fit an operand of this shape: one value (per step) per
        tensor; per channel, one per index of the axis (a 1-D table) or a table that broadcasts
        against the operand. Symbolic (dynamic) sizes are not checked."""
        rows = tuple(self.scale.shape[1:] if self.spec.mode == "per_step" else self.scale.shape)
        same = lambda r, o: r == o or not isinstance(o, int)  # noqa: E731
        if self.spec.granularity == "tensor":
            fits = math.prod(rows) == 1
        elif len(rows) == 1:
            fits = same(rows[0], operand[self.spec.axis])
        else:
            fits = len(rows) <= len(operand) and all(r == 1 or same(r, o) for r, o in zip(reversed(rows), reversed(operand)))
        if not fits:
            raise ValueError(f"scale of shape {tuple(self.scale.shape)} does not fit a {self.spec.granularity} "
                             f"{self.spec.mode} spec of an operand of shape {tuple(operand)}")
        if self.qvalues is not None and unpacked_shape(self.qvalues) != tuple(operand):
            raise ValueError(f"integer weights of shape {unpacked_shape(self.qvalues)} do not fit a weight of shape {tuple(operand)}")

    @property
    def codes(self) -> Tensor | None:
        """A weight's integer codes as they are (int8 / int16), unpacked where ``qvalues`` is packed."""
        return None if self.qvalues is None else integer_codes(self.qvalues)

    @staticmethod
    def _code_dtype(spec: QuantSpec) -> torch.dtype:
        return torch.int8 if spec.bits <= 8 else torch.int16

    @classmethod
    def weight_storage(cls, spec: QuantSpec, codes: Tensor) -> Tensor:
        """Integer weight codes in the form ``qvalues`` keeps them: packed two per byte where ``packable``."""
        if packable(spec.bits, tuple(codes.shape)):
            return pack_int4(codes)
        return codes.to(cls._code_dtype(spec))

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """The float range the quantization grid covers, per parameter row."""
        return (self.spec.qmin - self.zero_point) * self.scale, (self.spec.qmax - self.zero_point) * self.scale

    def tensors(self) -> dict[str, Tensor]:
        names = ("scale", "zero_point", "timesteps", "qvalues")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
