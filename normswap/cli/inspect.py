"""``normswap inspect`` and ``normswap variants``."""

from __future__ import annotations

import warnings

import click

from normswap.api import conversion as api
from normswap.cli.common import echo_json
from normswap.variants import registry


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--strict-trace", is_flag=True, help="Fail instead of falling back to the module walk.")
def inspect_cmd(model: str, as_json: bool, strict_trace: bool) -> None:
    """List the norm and activation sites of MODEL (structure only: no weights are loaded).

    MODEL is a torchvision name (resnet50), torchvision:NAME, timm:NAME, hf:PATH,
    pkg.module:factory or path/to/file.py:factory.

    \b
    Examples:
      normswap inspect resnet50
      normswap inspect timm:efficientnet_b0 --json
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inspect builds the architecture only; 'random init' is expected
        result = api.inspect(model, strict_trace=strict_trace)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(result.render())


@click.command("variants")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def variants_cmd(as_json: bool) -> None:
    """List the registered variants (built-ins and plugins)."""
    rows = []
    for name in registry.names():
        cls = registry.get(name)
        opts = [f for f in cls.config_class.__dataclass_fields__ if f != "strength"]
        rows.append({"name": name, "description": cls.description, "options": opts})
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        opts = ", ".join(row["options"]) or "none"
        click.echo(f"{row['name']:<12} {row['description']}  (options: {opts})")
