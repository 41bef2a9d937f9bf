"""A model calibrated once, from which the decide and convert passes can make several quantized models.

Post-training quantization reads the calibration data once (``lowbit.core.quantize.calibrate``);
analyses that compare decisions — each layer quantized alone (sensitivity), raised bit-widths under a
budget (mixed precision) — then copy the calibrated graph for each try, change which layers are
quantized and at what bit-widths, and run the recipe's decide and convert passes on the copy with the
same statistics: no recapture and no second calibration.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.fx

from lowbit.core.quantized_model import QuantizedModel
from lowbit.ir.annotations import LAYER_KEY, QUANT_KEY
from lowbit.ir.precision import Precision
from lowbit.passes import PassContext, Pipeline
from lowbit.passes.annotate_quantization import AnnotateQuantization
from lowbit.passes.pipeline import PassRecord
from lowbit.recipes import Recipe

__all__ = ["Calibrated"]


@dataclass
class Calibrated:
    """A model captured, prepared and calibrated for a recipe: its graph with observers, the pass
    context holding the merged statistics, and the calibration samples kept for analyses."""

    model: torch.nn.Module
    recipe: Recipe
    graph: torch.fx.GraphModule
    context: PassContext  # ``samples`` holds what the recipe's decide passes need
    samples: list[dict]  # the kept calibration samples (graph inputs): ``context.samples`` and maybe more
    records: list[PassRecord]

    def quantized_layers(self) -> dict[str, str]:
        """Path -> kind of every layer the recipe quantizes."""
        return _quantized_layers(self.graph)

    def decide(self) -> QuantizedModel:
        """The recipe's quantized model (this calibration's graph and context are used up)."""
        return self._finish(self.recipe, self.graph, self.context)

    def variant(self, *, only: set[str] | None = None, precision: Precision | None = None) -> QuantizedModel:
        """The quantized model of a copy of this calibration in which only the layers with a path in
        ``only`` (default: all) are quantized, at the bit-widths of ``precision`` (default: the recipe's).

        ``precision`` may raise layers or keep them in floating point, not quantize layers the recipe
        keeps in floating point: those were not observed.
        """
        graph = copy.deepcopy(self.graph)
        recipe = self.recipe if precision is None else replace(self.recipe, precision=precision)
        context = PassContext(precision=recipe.precision, step_arg=self.context.step_arg,
                              observations=self.context.observations, samples=self.context.samples)
        if precision is not None:
            quantized = set(self.quantized_layers())
            Pipeline([AnnotateQuantization()]).run(graph, context)
            added = sorted(set(_quantized_layers(graph)) - quantized)
            if added:
                raise ValueError(f"the precision quantizes {added}, which recipe {self.recipe.name!r} keeps in floating point: "
                                 f"they were not calibrated; calibrate with a recipe that quantizes them")
        if only is not None:
            for node in graph.graph.nodes:
                if LAYER_KEY in node.meta and node.meta[LAYER_KEY].path not in only:
                    node.meta.pop(QUANT_KEY, None)
        return self._finish(recipe, graph, context)

    def _finish(self, recipe: Recipe, graph: torch.fx.GraphModule, context: PassContext) -> QuantizedModel:
        passes = Pipeline(recipe.phase_passes("decide", "convert"))
        graph = passes.run(graph, context)
        return QuantizedModel(graph, self.model, recipe, context.params, context.artifacts, context.step_arg,
                              self.records + passes.records)


def _quantized_layers(graph: torch.fx.GraphModule) -> dict[str, str]:
    return {n.meta[LAYER_KEY].path: n.meta[LAYER_KEY].kind for n in graph.graph.nodes if LAYER_KEY in n.meta and QUANT_KEY in n.meta}
