"""Recipe registry. Each recipe module is imported here explicitly (timm-style), which registers it."""
from .base import (Recipe, RecipeConfig, StepContext, StepOutput, TextSide, UnknownRecipeError, create_recipe,
                   get_recipe_class, list_recipes, register_recipe)
# (registration; the grace module registers grace, grace_fast and grace_lite)
from . import adversarial, fare, flyp, ft, grace, lp_ft, pmg_aft, proximal, sam, wise_ft  # noqa: F401

__all__ = ["Recipe", "RecipeConfig", "StepContext", "StepOutput", "TextSide", "UnknownRecipeError", "create_recipe",
           "get_recipe_class", "list_recipes", "register_recipe"]
