"""Recipe registry. Each recipe module is imported here explicitly (timm-style), which registers it."""
from .base import (Recipe, RecipeConfig, StepContext, StepOutput, UnknownRecipeError, create_recipe,
                   get_recipe_class, list_recipes, register_recipe)
from . import ft, grace  # noqa: F401  (registration side effect)

__all__ = ["Recipe", "RecipeConfig", "StepContext", "StepOutput", "UnknownRecipeError", "create_recipe",
           "get_recipe_class", "list_recipes", "register_recipe"]
