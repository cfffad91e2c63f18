"""Entry point of the ``normswap`` command."""

from __future__ import annotations

import click

from normswap.version import __version__
from normswap.cli.calibrate import calibrate_cmd, eval_cmd
from normswap.cli.common import NormswapGroup
from normswap.cli.convert import convert_cmd
from normswap.cli.diagnose import diagnose_cmd
from normswap.cli.export import export_cmd
from normswap.cli.finetune import finetune_cmd
from normswap.cli.inspect import inspect_cmd, variants_cmd
from normswap.cli.recipe import recipe_cmd


@click.group(cls=NormswapGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="normswap")
def cli() -> None:
    """normswap: swap a pretrained network's normalisation for UAN, PatchNorm or ANAct.

    Every conversion starts as an exact copy of the original (strength 0) and is verified.

    \b
    Examples:
      normswap inspect resnet50
      normswap variants
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to uan -o mnv2-uan.safetensors
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to uan --calibrate photos -o mnv2-uan.safetensors
      normswap eval mnv2-uan.safetensors --data photos --strengths 0,0.1,1
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to anact -o mnv2-anact.safetensors
      normswap export mnv2-anact.safetensors -o mnv2-anact-export.safetensors
    """


cli.add_command(inspect_cmd)
cli.add_command(variants_cmd)
cli.add_command(convert_cmd)
cli.add_command(calibrate_cmd)
cli.add_command(eval_cmd)
cli.add_command(export_cmd)
cli.add_command(diagnose_cmd)
cli.add_command(recipe_cmd)
cli.add_command(finetune_cmd)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="normswap")
