"""Trainable fake quantizers: what quantization-aware training (FraQAT, LSQ) runs the graph through.

Rounding has a zero gradient almost everywhere, so every quantizer here uses the straight-through
estimator: the forward value is the quantized one, the backward pass treats quantization as the
identity (Bengio et al. 2013; FraQAT §3). The quantizers are modules, called from ``call_module``
nodes under the graph's :data:`FAKE_QUANTIZERS` submodule, so that autograd runs through the
captured graph as it is and the convert pass later finds every node it knows.

A weight's bit-width is a buffer, ``bits``, and may be any real number in [2, 16]: FraQAT's
fractional grid has floor(2^b) levels, the symmetric range [-floor(2^b)/2, floor(2^b)/2 - 1]
(INT5.5: [-22, 21]; INT4.25: [-9, 8]) and the scale max|W| / (2^(b-1) - 1) per output channel
(FraQAT's Q = round((2^(b-1) - 1) / max|W| · W)). A schedule lowers ``bits`` between steps; no
recapture, no new graph. With ``lsq`` the per-channel step is a parameter learned with LSQ's
gradient scale 1/sqrt(numel · qmax) (Esser et al. 2020), rescaled when the bit-width changes.
Activations, Q, K, V and attention probabilities are quantized with the parameters that
``choose_quant_params`` chose from calibration (or per tensor at run time when dynamic), at their
final bit-widths throughout, as FraQAT keeps activations at 8 bits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from lowbit.ir.annotations import MAX_BITS, QuantSpec
from lowbit.ir.ops import dynamic_params, quantize_probs, timestep_row, uniform_quantize
from lowbit.ir.params import OperandParams

__all__ = ["FAKE_QUANTIZERS", "OperandFakeQuantizer", "WeightFakeQuantizer", "fake_quantizers", "fractional_grid",
           "fractional_scale", "quantization_disabled", "straight_through"]

FAKE_QUANTIZERS = "lowbit_fake_quantizers"
_EPS = 1e-8


def straight_through(x: Tensor, quantized: Tensor) -> Tensor:
    """``quantized`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (quantized - x).detach()


def fractional_grid(bits: float) -> tuple[int, int]:
    """(qmin, qmax) of a symmetric grid at a real-valued bit-width: floor(2^b) levels."""
    spec = QuantSpec(float(bits), symmetric=True, granularity="channel", axis=0)
    return spec.qmin, spec.qmax


def fractional_scale(weight: Tensor, bits: float) -> Tensor:
    """FraQAT's per-output-channel scale max|W| / (2^(b-1) - 1), shaped to broadcast against ``weight``."""
    amax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(1).clamp_min(_EPS)
    return (amax / (2.0 ** (float(bits) - 1.0) - 1.0)).reshape((-1,) + (1,) * (weight.dim() - 1))


class WeightFakeQuantizer(torch.nn.Module):
    """A weight W fake-quantized as Q(W + Δ) per output channel at the real-valued bit-width in the
    buffer ``bits``; Δ is what training learns, so W (the user's parameter) is never written.

    ``final`` is the layer's bit-width after training (its spec in the recipe); a schedule sets
    ``bits`` to ``final`` plus the stage's distance above it, capped at 16.
    """

    def __init__(self, target: str, weight: Tensor, final: float, lsq: bool = False):
        super().__init__()
        self.target, self.final = target, float(final)
        self.register_buffer("bits", torch.tensor(self.final))
        self.enabled = True
        self.delta = torch.nn.Parameter(torch.zeros_like(weight))
        self.step = torch.nn.Parameter(fractional_scale(weight, self.final)) if lsq else None

    def set_bits(self, bits: float) -> None:
        """Change the grid; a learned step keeps its ratio to FraQAT's scale."""
        bits = min(float(bits), MAX_BITS)
        if self.step is not None:
            with torch.no_grad():
                self.step.mul_((2.0 ** (float(self.bits) - 1.0) - 1.0) / (2.0 ** (bits - 1.0) - 1.0))
        self.bits.fill_(bits)

    def scale(self, weight: Tensor) -> Tensor:
        if self.step is None:
            return fractional_scale(weight, float(self.bits))
        _, qmax = fractional_grid(float(self.bits))
        grad_scale = 1.0 / math.sqrt(weight[0].numel() * qmax)  # LSQ: 1/sqrt(weights per step · qmax)
        step = self.step.clamp_min(_EPS)  # a step pushed through zero would flip the grid
        return step * grad_scale + (step - step * grad_scale).detach()

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        weight = weight + self.delta
        qmin, qmax = fractional_grid(float(self.bits))
        scale = self.scale(weight)
        scaled = weight.float() / scale
        codes = torch.clamp(straight_through(scaled, torch.round(scaled)), qmin, qmax)
        return (codes * scale).to(weight.dtype)

    def final_params(self, weight: Tensor, spec: QuantSpec) -> OperandParams:
        """The integer weights and scales the convert pass emits, at the final bit-width."""
        if float(self.bits) != spec.bits:
            raise ValueError(f"{self.target}: the fake quantizer is at {float(self.bits):g} bits, but the layer's final "
                             f"bit-width is {spec.bits:g}: finish the schedule before converting")
        with torch.no_grad():
            weight = weight + self.delta
            scale = self.scale(weight).reshape(-1)
            shape = (-1,) + (1,) * (weight.dim() - 1)
            q = torch.clamp(torch.round(weight.float() / scale.reshape(shape)), spec.qmin, spec.qmax)
        return OperandParams(spec, scale.float().clone(), torch.zeros_like(scale, dtype=torch.float32),
                             qvalues=OperandParams.weight_storage(spec, q))


class OperandFakeQuantizer(torch.nn.Module):
    """An activation, Q, K, V or attention-probability operand fake-quantized as the convert pass will
    quantize it: with the calibrated (per-step) parameters, or per tensor/token at run time."""

    def __init__(self, target: str, spec: QuantSpec, params: OperandParams | None, start_token: int | None = None):
        super().__init__()
        self.target, self.spec = target, spec
        self.start_token = -1 if start_token is None else start_token
        self.enabled = True
        for name in ("scale", "zero_point", "timesteps"):
            value = getattr(params, name) if params is not None else None
            self.register_buffer(name, value.clone() if value is not None else None)
        self.is_probs = target.endswith(":probs")

    def _params(self, x: Tensor, timestep: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if self.spec.mode == "dynamic":
            if self.is_probs:
                return None, None  # quantize_probs takes the scale from the tensor
            per_token = self.spec.granularity == "token"
            return tuple(dynamic_params(x, self.spec.qmin, self.spec.qmax, per_token, f) for f in ("scale", "zero_point"))
        if self.timesteps is None:
            return self.scale, self.zero_point
        if timestep is None:
            raise ValueError(f"{self.target} has per-step parameters but its quantizer was given no step")
        return timestep_row(self.scale, self.timesteps, timestep), timestep_row(self.zero_point, self.timesteps, timestep)

    def forward(self, x: Tensor, timestep: Tensor | None = None) -> Tensor:
        if not self.enabled:
            return x
        with torch.no_grad():
            scale, zero_point = self._params(x.detach(), timestep)
            if self.is_probs:
                quantized = quantize_probs(x.detach(), scale, zero_point, self.spec.scheme, self.spec.qmin, self.spec.qmax,
                                           self.start_token, self.spec.mode == "dynamic")
            else:
                quantized = uniform_quantize(x.detach(), scale, zero_point, self.spec.qmin, self.spec.qmax)
        return straight_through(x, quantized)


def fake_quantizers(gm: torch.nn.Module) -> list[WeightFakeQuantizer | OperandFakeQuantizer]:
    holder = getattr(gm, FAKE_QUANTIZERS, None)
    return list(holder.children()) if holder is not None else []


@contextmanager
def quantization_disabled(gm: torch.nn.Module) -> Iterator[None]:
    """Run ``gm`` in full precision within the block (the teacher of distillation)."""
    quantizers = fake_quantizers(gm)
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q in quantizers:
            q.enabled = True
