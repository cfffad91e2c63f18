"""``normswap finetune RECIPE``: convert, calibrate, fine-tune with the strength schedule, evaluate, save."""

from __future__ import annotations

import click

from normswap.cli.common import echo_json

_SET_HELP = "Override one recipe value, KEY.PATH=VALUE (a YAML value); repeatable."


@click.command("finetune")
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=_SET_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The final model's path instead of the recipe's output.path (the run folder goes next to it).")
@click.option("--force", is_flag=True, help="Start over: replace an existing output and run folder.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose checkpoint is in the run folder.")
@click.option("--dry-run", is_flag=True, help="Convert and open the data, say what would run; train nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def finetune_cmd(recipe: str, overrides: tuple[str, ...], output: str | None, force: bool, resume: bool,
                 dry_run: bool, as_json: bool) -> None:
    """Run a fine-tuning RECIPE (YAML): convert the model (exact start), calibrate, raise the
    strength on the schedule while distilling from the original, evaluate, and save the model at
    the final strength. Prints a summary: the original, the converted model before and after
    fine-tuning at strength 0 and 1, and the control (the original fine-tuned with the same
    budget). Checkpoints, metrics (JSONL), the best model, summary.json and training.png go to
    OUTPUT_STEM.run/ next to the output. Runs under torchrun too (DDP; rank 0 writes).

    \b
    Examples:
      normswap finetune recipes/fmnist-uan.yaml
      normswap finetune recipes/fmnist-patchnorm.yaml --set finetune.steps=100 -o pn.safetensors --force
      normswap finetune recipes/fmnist-uan.yaml --resume
      torchrun --nproc_per_node 2 -m normswap finetune recipes/fmnist-uan.yaml --force
    """
    from normswap.core import dist
    from normswap.train.run import finetune

    result = finetune(recipe, overrides=overrides, output=output, force=force, resume=resume, dry_run=dry_run,
                      progress=not as_json)
    if dist.world().rank != 0:
        return
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.render())
    if not result.dry_run:
        click.echo(f"saved {result.output} (run folder {result.run_dir})")
