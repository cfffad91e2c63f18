"""``normswap convert``."""

from __future__ import annotations

from typing import Any

import click

from normswap.api import conversion as api
from normswap.api.calibration import check_data
from normswap.cli.calibrate import (calibration_options, data_options, emit, is_main_process, run_calibration,
                                    split_kwargs)
from normswap.cli.common import echo_json, parse_options, split_patterns
from normswap.core.plan import Plan
from normswap.io import check_output
from normswap.sources import load_model


def render_plan(plan: Plan) -> str:
    """A table of the plan's sites: action, name, pattern, reason."""
    rows = [(s.action, s.name + (f" (+{', '.join(s.absorbs)})" if s.absorbs else ""), s.pattern, s.path, s.reason)
            for s in plan.sites]
    head = ("action", "site", "pattern", "path", "reason")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [f"plan: {len(plan.converted)} site(s) to convert to {plan.variant}, {len(plan.skipped)} left alone "
             f"(strength {plan.strength:g}; found by {'torch.fx' if plan.trace_path == 'fx' else 'module walk'})"]
    if plan.trace_error:
        lines.append(f"  trace failed, used the module walk: {plan.trace_error}")
    for row in [head, *rows]:
        lines.append(("  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]).rstrip())
    return "\n".join(lines)


def dry_run_checks(model: str, variant: str, targets: list[str], exclude: list[str], strength: float,
                   opts: dict[str, str], weights: str | None, strict_trace: bool, trust_source: bool,
                   calib_data: str | None, kw: dict[str, Any]) -> Plan:
    """Everything ``convert`` checks before converting, so a dry run reaches the real run's verdict: the model
    and its weights, the plan (and that it converts something), the output (checked by the caller) and, with
    ``--calibrate``, the data and its options on one sample. Only the conversion, its verification and the
    writing are left out."""
    module, source = load_model(model, weights, allow_code=trust_source)
    plan = api.plan(module, variant, targets, exclude, strength, opts, strict_trace=strict_trace)
    api.require_sites(plan, module)
    if calib_data is not None:
        args = split_kwargs(dict(kw))
        check_data(module, calib_data, source=source, calib_samples=args["calib_samples"],
                   eval_samples=args["eval_samples"], seed=args["seed"], data_options=args["data_options"])
    return plan


@click.command("convert")
@click.argument("model")
@click.option("--to", "variant", required=True, help="Variant to convert into (see `normswap variants`).")
@click.option("--targets", multiple=True, metavar="PATTERN",
              help="Sites to convert: a type (BatchNorm2d), a module name, .suffix or re:REGEX. Repeatable, comma-separated.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Sites to leave alone (applied first). Same forms.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="0 = exact copy of the original, 1 = the paper's layer.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Variant setting, e.g. --option k=5.")
@click.option("--weights", default=None, metavar="NAME|none|FILE",
              help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), 'none' for random init, or a .safetensors/.pt file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output .safetensors file [default: MODEL-VARIANT.safetensors].")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--dry-run", is_flag=True, help="Check everything the real run checks (model, weights, plan, output, "
              "calibration data), print the plan; convert and write nothing.")
@click.option("--strict-trace", is_flag=True, help="Fail if torch.fx cannot trace the model (no module-walk fallback).")
@click.option("--trust-source", is_flag=True, help="Let an hf:DIR that ships its own Python code run it.")
@click.option("--calibrate", "calib_data", default=None, metavar="DATA",
              help="Calibrate on DATA after converting and print the fidelity report (photos, fashion-mnist, a "
                   "folder, a .safetensors file; see `normswap calibrate --help`). The data options below apply.")
@data_options
@calibration_options
def convert_cmd(model: str, variant: str, targets: tuple[str, ...], exclude: tuple[str, ...], strength: float,
                options: tuple[str, ...], weights: str | None, output: str | None, force: bool, dry_run: bool,
                strict_trace: bool, as_json: bool, calib_data: str | None, trust_source: bool, **kw: Any) -> None:
    """Convert MODEL's norm layers to a variant, verify the exact start, and save it.

    MODEL is a torchvision name (resnet50), torchvision:NAME, timm:NAME, hf:PATH,
    pkg.module:factory or path/to/file.py:factory. torchvision models are pretrained by
    default (--weights DEFAULT); this machine may be offline, so pass a cached weights
    name, a file, or --weights none.

    \b
    Examples:
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to uan -o mnv2-uan.safetensors
      normswap convert resnet50 --weights none --to uan --option k=5 --exclude layer4
      normswap convert resnet18 --weights none --to uan --dry-run
      normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to patchnorm --strength 1 --calibrate photos
      normswap convert timm:efficientnet_b0 --weights none --to uan --targets re:blocks\\.[0-2]\\..*
    """
    opts = parse_options(options)
    target_list, exclude_list = split_patterns(targets), split_patterns(exclude)
    default = f"{model.replace(':', '-').replace('/', '_').strip('._-')}-{variant}.safetensors"
    out_path = check_output(output if output is not None else default, force=force)  # fail before any work
    if dry_run:
        plan = dry_run_checks(model, variant, target_list, exclude_list, strength, opts, weights, strict_trace,
                              trust_source, calib_data, kw)
        echo_json({"plan": plan.to_dict()}) if as_json else click.echo(render_plan(plan))
        return
    result = api.convert(model, variant, target_list, exclude_list, strength, opts, weights=weights,
                         strict_trace=strict_trace, trust_source=trust_source)
    fidelity = run_calibration(result, calib_data, kw).report if calib_data else None
    if not is_main_process():
        return
    saved = result.save(out_path, force=force)
    if as_json:
        echo_json({"plan": result.plan.to_dict(), "report": result.report.to_dict(), "output": str(saved),
                   "fidelity": fidelity.to_dict() if fidelity else None})
        return
    click.echo(render_plan(result.plan))
    click.echo(result.report.render())
    if fidelity is not None:
        emit(fidelity, False)
    click.echo(f"saved {saved}")
