"""``normswap diagnose``: what a normalisation does to a model, layer by layer (a thin shell over the API)."""

from __future__ import annotations

import sys
from typing import Any

import click

from normswap.cli.calibrate import DATA_HELP
from normswap.cli.common import echo_json


@click.command("diagnose")
@click.argument("model", metavar="MODEL_OR_CKPT")
@click.option("--weights", default=None, metavar="NAME|none|FILE",
              help="Weights for a named MODEL (and named --compare models), as in `normswap convert`.")
@click.option("--data", default=None, metavar="DATA",
              help=DATA_HELP + " [default: the model's default data, else synthetic inputs (said in the report)]")
@click.option("--compare", multiple=True, metavar="OTHER", help="Another model or .safetensors file on the same axes.")
@click.option("--compare-to", multiple=True, metavar="VARIANT",
              help="Also diagnose MODEL converted to VARIANT (exact start verified), e.g. --compare-to patchnorm.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0), default=None,
              help="Run every converted layer at this strength [default: as saved].")
@click.option("--at-init", is_flag=True, help="Also measure the batch geometry of a fresh initialisation.")
@click.option("--batch-stats", is_flag=True, help="BatchNorm-like layers use batch statistics (restored after).")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True, help="Samples to run.")
@click.option("--batch-size", type=click.IntRange(min=3), default=16, show_default=True,
              help="Samples per batch (the batch geometry is per batch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data and the fresh initialisation.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Override the input size of image data.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write diagnose.json, the PNG figures and diagnose.html into this directory.")
@click.option("--force", is_flag=True, help="Overwrite report files in --out.")
@click.option("--trust-source", is_flag=True, help="Allow rebuilding a model made by custom code named in a file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def diagnose_cmd(model: str, weights: str | None, data: str | None, compare: tuple[str, ...],
                 compare_to: tuple[str, ...], image_size: int | None, out_dir: str | None, as_json: bool,
                 **kw: Any) -> None:
    """Measure per layer what the normalisation does: affine divergence, forward and
    gradient variance, activation gains, batch geometry (BN decomposed), UAN mixtures.

    The model and each --compare run on the same batches; with --out the figures (one
    per measure against depth) and a self-contained HTML report are written.

    \b
    Examples:
      normswap diagnose resnet18 --weights none --at-init --out diag-r18
      normswap diagnose mobilenet_v2 --weights IMAGENET1K_V1 --compare-to uan --compare-to patchnorm \\
          --strength 1 --samples 16 --image-size 112 --out diag-mnv2
      normswap diagnose mnv2-pn.safetensors --compare mobilenet_v2 --weights IMAGENET1K_V1 --json
    """
    from normswap.diagnostics.session import diagnose

    options = {"image_size": image_size} if image_size is not None else {}
    report = diagnose(model, data, compare=list(compare), compare_to=list(compare_to), weights=weights,
                      data_options=options, progress=sys.stderr.isatty(), out=out_dir, **kw)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.render())
