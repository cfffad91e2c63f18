"""``normswap recipe validate|show|schema``: check, resolve and describe fine-tuning recipe files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from normswap.cli.common import echo_json
from normswap.errors import OutputError, RecipeError
from normswap.io import atomic_write, check_output
from normswap.recipe import dump_recipe, load_recipe, recipe_schema
from normswap.recipe.schema import Recipe

_SET_HELP = "Override one recipe value, KEY.PATH=VALUE (a YAML value); repeatable."


def summary(recipe: Recipe) -> str:
    """``variant uan, 600 steps, strength 0 -> 1 linear, ...``: what a recipe will do, in one line."""
    ft, st, dist = recipe.finetune, recipe.strength, recipe.distill
    budget = f"{ft.steps} steps" if ft.steps is not None else f"{ft.epochs:g} epochs"
    losses = [f"{name} {weight:g}" for name, weight in
              (("kl", dist.kl_weight), ("label", dist.label_weight), ("feature", dist.feature_weight)) if weight]
    return (f"model {recipe.model.source}, variant {recipe.convert.to}, {budget}, "
            f"strength {st.from_:g} -> {st.to:g} {st.shape}, distill {' + '.join(losses)}, "
            f"output {recipe.output.path}")


@click.group("recipe")
def recipe_cmd() -> None:
    """Check, resolve and describe fine-tuning recipe files (YAML; see docs/recipes.md).

    \b
    Examples:
      normswap recipe validate recipes/fmnist-uan.yaml
      normswap recipe validate recipes/fmnist-uan.yaml --set finetune.optimizer.lr=3e-4
      normswap recipe show recipes/fmnist-uan.yaml --set finetune.steps=50
      normswap recipe schema -o recipe.schema.json
    """


@recipe_cmd.command("validate", short_help="Check a recipe against the schema.")
@click.argument("file", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=_SET_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {file, ok, summary} or {file, ok: false, error, problems} (exit 2).")
def validate_cmd(file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a recipe: `FILE: ok (...)`, or its first problem in one line (exit 2).

    Unknown keys (with a did-you-mean), wrong types, out-of-range values, missing fields and
    broken cross-field rules are reported with their dotted path and YAML line; --json lists
    every problem.

    \b
    Examples:
      normswap recipe validate recipes/fmnist-uan.yaml
      normswap recipe validate recipes/fmnist-uan.yaml --set strength.shape=cosine --json
    """
    try:
        recipe = load_recipe(file, overrides)
    except RecipeError as exc:
        if not as_json:
            raise
        echo_json({"file": file, "ok": False, "error": str(exc), "problems": exc.problems})
        sys.exit(exc.exit_code)
    if as_json:
        echo_json({"file": file, "ok": True, "summary": summary(recipe)})
    else:
        click.echo(f"{file}: ok ({summary(recipe)})")


@recipe_cmd.command("show", short_help="Print the fully resolved recipe.")
@click.argument("file", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=_SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def show_cmd(file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied).

    The YAML output is itself a valid recipe that loads to the same settings.

    \b
    Examples:
      normswap recipe show recipes/fmnist-uan.yaml
      normswap recipe show recipes/fmnist-uan.yaml --set finetune.steps=50 --set control=false
      normswap recipe show recipes/fmnist-uan.yaml --json
    """
    recipe = load_recipe(file, overrides)
    if as_json:
        echo_json(recipe.to_dict())
    else:
        click.echo(dump_recipe(recipe), nl=False)


@recipe_cmd.command("schema", short_help="Print the recipe JSON Schema.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the schema to this file (atomically) instead of standard output.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def schema_cmd(output: str | None, force: bool) -> None:
    """Print the recipe JSON Schema (draft 2020-12), for editors and CI.

    \b
    Examples:
      normswap recipe schema > recipe.schema.json
      normswap recipe schema -o recipe.schema.json --force

    In VS Code (YAML extension), a first line `# yaml-language-server: $schema=recipe.schema.json`
    gives completion and checking while editing.
    """
    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    path = check_output(output, force=force)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    click.echo(f"wrote {path}")
