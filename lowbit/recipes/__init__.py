"""Recipes: a precision (per-layer bit-widths) and a pipeline of passes, as data that reads from TOML.

The built-in recipes are TOML files in ``builtin/``; see ``recipe.py`` for the format.
"""

from lowbit.recipes.builtin import get_recipe, recipes
from lowbit.recipes.recipe import RECIPE_VERSION, STANDARD_PASSES, PassStep, Recipe, RecipeError

__all__ = ["RECIPE_VERSION", "STANDARD_PASSES", "PassStep", "Recipe", "RecipeError", "get_recipe", "recipes"]
