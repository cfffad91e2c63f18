"""Fine-tuning recipes: a strict, versioned YAML schema (``schema``) and its loader (``load``)."""

from normswap.recipe.load import dump_recipe, load_recipe, parse_recipe, recipe_schema
from normswap.recipe.schema import SCHEMA_VERSION, Recipe

__all__ = ["Recipe", "SCHEMA_VERSION", "dump_recipe", "load_recipe", "parse_recipe", "recipe_schema"]
