"""Recipes: YAML -> validated Recipe (load, parser, types) -> per-key Plan of frozen nodes (planner). No tensors."""

from mergekit_sdxl.recipe.describe import describe_plan
from mergekit_sdxl.recipe.formula import Formula, parse_formula
from mergekit_sdxl.recipe.load import load_recipe, parse_model_overrides
from mergekit_sdxl.recipe.parser import parse_recipe
from mergekit_sdxl.recipe.planner import InputHeader, Plan, build_plan
from mergekit_sdxl.recipe.types import Recipe

__all__ = [
    "Formula",
    "InputHeader",
    "Plan",
    "Recipe",
    "build_plan",
    "describe_plan",
    "load_recipe",
    "parse_formula",
    "parse_model_overrides",
    "parse_recipe",
]
