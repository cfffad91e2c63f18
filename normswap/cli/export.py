"""``normswap export``."""

from __future__ import annotations

import click

from normswap.api import conversion as api
from normswap.cli.common import echo_json, existing_file, sibling_output
from normswap.io import check_output


@click.command("export")
@click.argument("input_path", metavar="IN.safetensors", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output .safetensors file [default: IN-export.safetensors].")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--trust-source", is_flag=True,
              help="Allow rebuilding a model made by a pkg.module:factory or file.py:factory named in the file.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (folded, kept, diff, output).")
def export_cmd(input_path: str, output: str | None, force: bool, trust_source: bool, as_json: bool) -> None:
    """Fold a converted model's variant layers away for inference, check it, and save it.

    For ANAct, every site whose compensation is exact has its frozen scale c and mean mu
    folded into the layers that consume it, and gets its plain activation back: the
    exported model has no ANAct module at those sites and computes the same function
    (checked on a probe batch). Sites that are not exact stay ANAct. The output is a
    normal normswap file: `normswap.load` rebuilds it.

    \b
    Examples:
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to anact -o mnv2-anact.safetensors
      normswap export mnv2-anact.safetensors -o mnv2-anact-export.safetensors
      normswap export mnv2-anact.safetensors --force --json
    """
    out_path = check_output(output if output is not None else sibling_output(existing_file(input_path), "export"), force=force)  # fail before any work
    result = api.export(input_path, out_path, force=force, trust_source=trust_source)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.render())
    click.echo(f"saved {result.output}")
