"""Checks recipes without running them, and exports the recipe JSON Schema for editors.

    python -m recipes.validate recipes/*.yaml         # ok / the errors of each file; exit 1 if any is invalid
    python -m recipes.validate --json-schema > recipe.schema.json

Validation loads no model and touches no data: it checks keys, types, ranges, pruner names, patterns and the
sparsities they can reach. Whether a pattern fits each layer's shape is checked when the model is loaded, before
pruning.
"""

import argparse
import json
import sys

import inc_plugins

from .schema import RecipeError, load_recipe, recipe_json_schema, resolve_recipe_path

SCHEMA_ID = "https://github.com/inc-plugins/inc-plugins/recipes/recipe.schema.json"


def json_schema() -> dict:
    """The JSON Schema of a recipe, with the pruning types INC and the plugins register as an enum."""
    schema = recipe_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    stage = schema["$defs"]["PruningStage"]["properties"]["pruning_type"]
    stage["enum"] = inc_plugins.known_pruning_types()
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files, or bare names of shipped recipes")
    parser.add_argument("--json-schema", action="store_true", help="print the recipe JSON Schema and exit")
    args = parser.parse_args(argv)
    if args.json_schema:
        sys.stdout.write(json_schema_text())
        return 0
    if not args.recipes:
        parser.error("name at least one recipe file (or pass --json-schema)")
    failed = 0
    for argument in args.recipes:
        try:
            print(f"ok: {load_recipe(argument).name} ({resolve_recipe_path(argument)})")
        except RecipeError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
