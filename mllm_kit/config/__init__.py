"""Configuration: the recipe schema, loading (OmegaConf), presets, component resolution and ``--smoke``.

Everything a recipe names is resolved and checked here, once, at load time.
"""

from mllm_kit.config.load import load_recipe, recipe_from_dict
from mllm_kit.config.recipe import DataSpec, EvalSpec, ModelSpec, OptimSpec, Recipe, Stage, TrainerSpec
from mllm_kit.config.resolve import resolve_component, resolve_model
from mllm_kit.config.smoke import smoke_recipe

__all__ = [
    "DataSpec", "EvalSpec", "ModelSpec", "OptimSpec", "Recipe", "Stage", "TrainerSpec", "load_recipe", "recipe_from_dict",
    "resolve_component", "resolve_model", "smoke_recipe",
]
