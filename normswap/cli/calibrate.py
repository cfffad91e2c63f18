"""``normswap calibrate`` and ``normswap eval``, and the data options ``convert --calibrate`` shares."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from normswap.core import dist
from normswap.api.calibration import EM_INITS, calibrate, evaluate
from normswap.cli.common import echo_json, existing_file, sibling_output
from normswap.data import describe_specs
from normswap.io import check_output

DATA_HELP = "Data: " + "; ".join(line.split(None, 1)[0] for line in describe_specs().splitlines()) + \
    " (see `normswap calibrate --help`)."
DATA_DEFAULT = " [default: stamps for image classifiers; photos when the stamps package is not installed]"


def _floats(text: str | None, name: str, count: int | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{text}'", param_hint=f"'{name}'") from None
    if not values or (count is not None and len(values) not in (1, count)):
        raise click.BadParameter(f"expected 1 or {count} comma-separated numbers, got '{text}'", param_hint=f"'{name}'")
    return values


def _strengths(text: str | None) -> list[float] | None:
    """``--strengths``: comma-separated numbers, each in [0, 1]."""
    values = _floats(text, "--strengths")
    for v in values or []:
        if not 0.0 <= v <= 1.0:
            raise click.BadParameter(f"each strength must be in [0, 1], got {v:g}", param_hint="'--strengths'")
    return values


def data_options(func: Callable) -> Callable:
    """The options every data-driven command takes (split, preprocessing)."""
    options = [
        click.option("--eval-samples", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Held-out samples for the fidelity report."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, crops and EM."),
        click.option("--strengths", default=None, metavar="S1,S2,..",
                     help="Strengths to report end to end [default: 0, the model's and 1]."),
        click.option("--image-size", type=click.IntRange(min=1), default=None,
                     help="Override the input size the model's weights metadata gives."),
        click.option("--mean", default=None, metavar="M or M1,M2,M3", help="Override the normalisation mean."),
        click.option("--std", default=None, metavar="S or S1,S2,S3", help="Override the normalisation std."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def calibration_options(func: Callable) -> Callable:
    """Options of the fitting itself (calibrate and convert --calibrate)."""
    options = [
        click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Calibration samples (the budget)."),
        click.option("--calib-strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="Strength the statistics are fitted for [default: the model's, or 1 at 0]."),
        click.option("--reestimate-bn", is_flag=True,
                     help="Also re-estimate the running statistics of the BatchNorms left in the model."),
        click.option("--em-init", type=click.Choice(EM_INITS), default="quantile", show_default=True,
                     help="UAN: EM initialisation."),
        click.option("--em-samples", type=click.IntRange(min=2), default=4096, show_default=True,
                     help="UAN: values kept per channel for EM."),
        click.option("--em-tol", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
                     help="UAN: EM stops when the log-likelihood per value gains less than this (nats)."),
        click.option("--layerwise", is_flag=True,
                     help="PatchNorm: exact network order, one pass over the data per layer (slow).")]
    for option in reversed(options):
        func = option(func)
    return func


def split_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """The ``normswap.calibrate`` / ``evaluate`` keyword arguments from the shared CLI options (popped)."""
    data_opts = {"image_size": kw.pop("image_size"), "mean": _floats(kw.pop("mean"), "--mean", 3),
                 "std": _floats(kw.pop("std"), "--std", 3)}
    out = {"eval_samples": kw.pop("eval_samples"), "batch_size": kw.pop("batch_size"), "seed": kw.pop("seed"),
           "strengths": _strengths(kw.pop("strengths")),
           "data_options": {k: v for k, v in data_opts.items() if v is not None}}
    if "calib_strength" in kw:
        out.update(calib_samples=kw.pop("calib_samples"), strength=kw.pop("calib_strength"), reestimate_bn=kw.pop("reestimate_bn"),
                   em_init=kw.pop("em_init"), em_samples=kw.pop("em_samples"), em_tol=kw.pop("em_tol"),
                   layerwise=kw.pop("layerwise"))
    return out


def run_calibration(model: Any, data: str | None, kw: dict[str, Any], **extra: Any) -> Any:
    """Calibrate (progress bars on a terminal) under torchrun too; returns the CalibrationResult."""
    dist.init_from_env()
    return calibrate(model, data, progress=sys.stderr.isatty(), **split_kwargs(kw), **extra)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or the only process): the one that prints and writes."""
    return dist.world().rank == 0


def _with_data_help(func: Callable) -> Callable:
    func.__doc__ = (func.__doc__ or "").rstrip() + "\n\n    \b\n    DATA is one of:\n" + "\n".join(
        f"      {line}" for line in describe_specs().splitlines()) + "\n"
    return func


@click.command("calibrate")
@click.argument("checkpoint", metavar="CKPT.safetensors", type=click.Path(dir_okay=False))
@click.option("--data", default=None, metavar="DATA", help=DATA_HELP + DATA_DEFAULT)
@data_options
@calibration_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output file [default: CKPT-calibrated.safetensors].")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--trust-source", is_flag=True, help="Allow rebuilding a model made by custom code named in the file.")
@_with_data_help
def calibrate_cmd(checkpoint: str, data: str | None, output: str | None, force: bool, trust_source: bool,
                  as_json: bool, **kw: Any) -> None:
    """Fit a converted model's statistics on data, print the fidelity report, and save it.

    UAN: EM per channel (docs/methods.md section 3.3). PatchNorm: the per-channel gains, in network order
    against the original network's activations. ANAct: its statistics, refolded into the
    consumers. At strength 0 the calibrated model still computes the original function.
    The report compares with the original (reloaded from the file's source weights when
    possible) before and after calibration, at strength 0, the model's and 1.

    \b
    Examples:
      normswap calibrate mnv2-uan.safetensors --data photos -o mnv2-uan-cal.safetensors
      normswap calibrate fmnist-patchnorm.safetensors --data fashion-mnist --calib-strength 1 --json
      torchrun --nproc_per_node 2 -m normswap calibrate m.safetensors --data fashion-mnist
    """
    out_path = check_output(output if output is not None else sibling_output(existing_file(checkpoint), "calibrated"), force=force)
    result = run_calibration(checkpoint, data, kw, trust_source=trust_source)
    if is_main_process():
        saved = result.save(out_path, force=force)
        emit(result.report, as_json, saved=str(saved))


@click.command("eval")
@click.argument("checkpoint", metavar="CKPT.safetensors", type=click.Path(dir_okay=False))
@click.option("--data", default=None, metavar="DATA", help=DATA_HELP + DATA_DEFAULT)
@data_options
@click.option("--trust-source", is_flag=True, help="Allow rebuilding a model made by custom code named in the file.")
@_with_data_help
def eval_cmd(checkpoint: str, data: str | None, trust_source: bool, as_json: bool, **kw: Any) -> None:
    """Report how closely a converted model follows the original on held-out data.

    End to end (top-1 agreement, logit cosine, KL, relative error, accuracy when the data
    has labels) at the model's strength and at full strength, and per site. Changes nothing.

    \b
    Examples:
      normswap eval mnv2-uan-cal.safetensors --data photos
      normswap eval fmnist-uan.safetensors --data fashion-mnist --strengths 0,0.1,1 --json
    """
    report = evaluate(existing_file(checkpoint), data, trust_source=trust_source, progress=sys.stderr.isatty(),
                      **split_kwargs(kw))
    emit(report, as_json)


def emit(report: Any, as_json: bool, **extra: Any) -> None:
    """Print a fidelity report as text or JSON (``extra``: more top-level JSON keys / trailing lines)."""
    if as_json:
        echo_json({"report": report.to_dict() if report else None, **extra})
        return
    if report is not None:
        click.echo(report.render())
    for key, value in extra.items():
        click.echo(f"{key} {value}")


__all__ = ["calibrate_cmd", "calibration_options", "data_options", "emit", "eval_cmd", "is_main_process",
           "run_calibration"]
