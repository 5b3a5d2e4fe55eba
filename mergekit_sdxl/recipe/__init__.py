"""Recipes: YAML -> validated Recipe (schema) -> per-key Plan of frozen nodes (planner). No tensor maths here."""

from mergekit_sdxl.recipe.formula import Formula, parse_formula
from mergekit_sdxl.recipe.planner import InputHeader, Plan, build_plan, describe_plan
from mergekit_sdxl.recipe.schema import Recipe, load_recipe, parse_model_overrides, parse_recipe

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
