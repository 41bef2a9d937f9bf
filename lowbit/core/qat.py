"""Quantization-aware training in your own loop: ``prepare_qat`` → train → ``convert_qat`` (as torchao's QATConfig).

``lowbit.quantize`` with a ``fraqat-*`` or ``qat-*`` recipe trains inside its ``train_quantized``
pass (distillation on the calibration samples). Users who want their own data, loss (a task loss
next to distillation), optimizer or loop take the same recipe here instead: ``prepare_qat``
calibrates and inserts the fake quantizers, returns a :class:`QATModel` to train, and
``convert_qat`` folds them into the quantized model that saves, loads, compiles and exports like
any other. The recipe's ``train_quantized`` pass, if any, is skipped; a post-training recipe gets
the insert and fold passes added (LSQ steps: ``lsq = true`` on the recipe's insert pass)::

    prepared = lowbit.prepare_qat(model, "fraqat-w4a8", calibration)
    optimizer = torch.optim.Adam(prepared.trainable_parameters(), lr=3e-5)
    for step, (args, kwargs) in enumerate(data):
        prepared.set_bits(8 - 4 * step / len(data))  # any real bit-width; finish at the recipe's
        with torch.no_grad(), prepared.teacher():
            target = prepared(*args, **kwargs)
        loss = (prepared(*args, **kwargs)[0] - target[0]).pow(2).mean()
        ...
    qmodel = lowbit.convert_qat(prepared)
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import AbstractContextManager
from typing import Any, Iterable

import torch

from lowbit.core.calibrated import Calibrated
from lowbit.core.quantize import calibrate
from lowbit.core.quantized_model import QuantizedModel
from lowbit.ir.capture import SIGNATURE_KEY, normalize_inputs
from lowbit.ir.fake_quantizers import WeightFakeQuantizer, fake_quantizers, quantization_disabled
from lowbit.passes import Pass, Pipeline
from lowbit.recipes import Recipe, get_recipe

__all__ = ["QATModel", "convert_qat", "prepare_qat", "with_checkpoints"]


class QATModel(torch.nn.Module):
    """A calibrated model with trainable fake quantizers; call it as the original model."""

    def __init__(self, calibrated: Calibrated, rest: list[Pass]):
        super().__init__()
        self.graph_module = calibrated.graph
        object.__setattr__(self, "_calibrated", calibrated)
        self._rest = rest  # the recipe's passes that run at convert_qat

    def forward(self, *args, **kwargs) -> Any:
        kwargs.pop("return_dict", None)
        inputs = normalize_inputs(self._calibrated.model, args, kwargs, self._calibrated.context.step_arg)
        self.graph_module.meta[SIGNATURE_KEY].check(inputs, type(self._calibrated.model).__name__)
        return self.graph_module(**inputs)

    def weight_quantizers(self) -> list[WeightFakeQuantizer]:
        return [q for q in fake_quantizers(self.graph_module) if isinstance(q, WeightFakeQuantizer)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Each quantized weight's offset Δ (and learned step with LSQ): the model's own weights stay frozen."""
        return [p for q in self.weight_quantizers() for p in q.parameters()]

    def set_bits(self, bits: float) -> None:
        """Put the layers at the recipe's weight bit-width on ``bits``; layers set apart (a mixed recipe)
        move by the same distance from their own final bit-width."""
        above = float(bits) - self._calibrated.recipe.precision.weight_bits
        if above < 0:
            raise ValueError(f"{bits:g} bits is below the recipe's weight bit-width "
                             f"({self._calibrated.recipe.precision.weight_bits:g}): a schedule ends there")
        for q in self.weight_quantizers():
            q.set_bits(q.final + above)

    def teacher(self) -> AbstractContextManager:
        """Within the block the model runs in full precision (the distillation teacher)."""
        return quantization_disabled(self.graph_module)


def with_checkpoints(recipe: Recipe, folder: str | os.PathLike) -> Recipe:
    """``recipe`` with its training (if it trains) checkpointed to, and resumed from, ``folder``."""
    if not any(s.name == "train_quantized" for s in recipe.passes):
        return recipe
    return recipe.with_settings("train_quantized", checkpoint_dir=os.fspath(folder))


def prepare_qat(model: torch.nn.Module, recipe: str | os.PathLike | Recipe, calibration: Iterable, *,
                step_arg: str | None = "timestep", progress: bool = True) -> QATModel:
    """``model`` captured, calibrated and given trainable fake quantizers for ``recipe`` (weights at the
    recipe's bit-widths to start with; change them with :meth:`QATModel.set_bits`)."""
    recipe = get_recipe(recipe)
    for name in ("insert_fake_quantizers", "fold_fake_quantizers"):
        if not any(s.name == name for s in recipe.passes):
            recipe = recipe.with_pass(name)
    recipe = dataclasses.replace(recipe, passes=tuple(s for s in recipe.passes if s.name != "train_quantized"))
    calibrated = calibrate(model, recipe, calibration, step_arg=step_arg, progress=progress)
    decide = calibrated.recipe.phase_passes("decide", "convert")
    split = next(i for i, p in enumerate(decide) if p.name == "insert_fake_quantizers") + 1
    prepare = Pipeline(decide[:split])
    calibrated.graph = prepare.run(calibrated.graph, calibrated.context)
    calibrated.records += prepare.records
    return QATModel(calibrated, decide[split:])


def convert_qat(prepared: QATModel) -> QuantizedModel:
    """The quantized model of a trained :class:`QATModel`, at the recipe's final bit-widths."""
    calibrated = prepared._calibrated
    finish = Pipeline(prepared._rest)
    graph = finish.run(calibrated.graph, calibrated.context)
    return QuantizedModel(graph, calibrated.model, calibrated.recipe, calibrated.context.params, calibrated.context.artifacts,
                          calibrated.context.step_arg, calibrated.records + finish.records)
