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
    a weight carries its integer values in ``qvalues`` (int8 storage up to 8 bits, 4-bit weights
    included — packing is a lowering's concern — and int16 above).
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
        if self.qvalues is not None and self.qvalues.dtype != self.storage_dtype(self.spec):
            raise ValueError(f"{self.spec.bits:g}-bit integer weights are stored as {self.storage_dtype(self.spec)}, got {self.qvalues.dtype}")

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
        if self.qvalues is not None and tuple(self.qvalues.shape) != tuple(operand):
            raise ValueError(f"integer weights of shape {tuple(self.qvalues.shape)} do not fit a weight of shape {tuple(operand)}")

    @staticmethod
    def storage_dtype(spec: QuantSpec) -> torch.dtype:
        return torch.int8 if spec.bits <= 8 else torch.int16

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """The float range the quantization grid covers, per parameter row."""
        return (self.spec.qmin - self.zero_point) * self.scale, (self.spec.qmax - self.zero_point) * self.scale

    def tensors(self) -> dict[str, Tensor]:
        names = ("scale", "zero_point", "timesteps", "qvalues")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
