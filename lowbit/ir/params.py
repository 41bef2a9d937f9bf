"""Quantization parameters of one operand, as chosen from calibration statistics.

They are kept apart from the graph, keyed by "<layer path>:<operand>", so that a saved model
is just these tensors plus their specs: loading re-captures the model and replays them.
"""

from __future__ import annotations

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
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"scale {tuple(self.scale.shape)} and zero point {tuple(self.zero_point.shape)} differ in shape")
        if self.spec.mode == "per_step":
            if self.timesteps is None or self.timesteps.dim() != 1 or self.scale.shape[0] != self.timesteps.numel():
                raise ValueError("per-timestep parameters need one scale row per calibrated timestep")
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            raise ValueError("scales must be finite and positive")
        if self.qvalues is not None and self.qvalues.dtype != self.storage_dtype(self.spec):
            raise ValueError(f"{self.spec.bits:g}-bit integer weights are stored as {self.storage_dtype(self.spec)}, got {self.qvalues.dtype}")

    @staticmethod
    def storage_dtype(spec: QuantSpec) -> torch.dtype:
        return torch.int8 if spec.bits <= 8 else torch.int16

    def representable_range(self) -> tuple[Tensor, Tensor]:
        """The float range the quantization grid covers, per parameter row."""
        return (self.spec.qmin - self.zero_point) * self.scale, (self.spec.qmax - self.zero_point) * self.scale

    def tensors(self) -> dict[str, Tensor]:
        names = ("scale", "zero_point", "timesteps", "qvalues")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
