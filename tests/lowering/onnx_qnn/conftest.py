"""Shared fixtures for the QNN HTP lowering tests: the shipped reference model, a small
calibration of its own sampler, and quantized models cached per recipe for the session."""

import pytest
import torch

import lowbit
from lowbit.evaluation.run import calibrate_reference
from lowbit.models.reference import load_reference_model
from lowbit.recipes import Recipe, get_recipe


@pytest.fixture(scope="session")
def reference():
    return load_reference_model()


@pytest.fixture(scope="session")
def reference_calibration(reference):
    """One prompt (a CFG pair: batch 2) at the one timestep of a 1-step schedule: DGQ's K-means runs
    per operand and timestep, and the timestep schedule is tested with minmax (test_schedule.py)."""
    return calibrate_reference(reference, prompts=1, steps=1, progress=False)


EXTRA_RECIPES = {
    "dgq-w8a16": get_recipe("dgq-w8a16"),
    # uniform attention probabilities on a run-time grid [0, max], start-token column apart
    "uniform-dynamic-w8a8": Recipe.build("uniform-dynamic-w8a8", 8, 8, dynamic_attention_scale=True).with_pass("split_start_token"),
}


def recipe(name: str):
    """Built-in recipes, and the few the tests need that have no built-in name."""
    return EXTRA_RECIPES.get(name, name)


@pytest.fixture(scope="session")
def quantized(reference, reference_calibration):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = lowbit.quantize(reference, recipe(name), reference_calibration, progress=False)
        return cache[name]
    return get


def fp_output(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in kwargs.items() if k != "return_dict"}, return_dict=False)[0]
