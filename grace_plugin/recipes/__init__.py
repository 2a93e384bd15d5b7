"""Recipe registry. Each recipe module is imported here explicitly (timm-style), which registers it."""
from .base import (Recipe, RecipeConfig, StepContext, StepOutput, TextSide, UnknownRecipeError, create_recipe,
                   get_recipe_class, list_recipes, register_recipe)
from . import (digrap, fare, flyp, ft, ftp, grace, grace_fast, lp_ft, pmg_aft, sam, spd, tecoa,  # noqa: F401
               wise_ft)  # (registration)

__all__ = ["Recipe", "RecipeConfig", "StepContext", "StepOutput", "TextSide", "UnknownRecipeError", "create_recipe",
           "get_recipe_class", "list_recipes", "register_recipe"]
