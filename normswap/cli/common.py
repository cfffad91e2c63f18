"""Helpers shared by the CLI commands: option parsing, JSON output, error reporting."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import click

from normswap.errors import FileFormatError, NormswapError


def split_patterns(values: Iterable[str]) -> list[str]:
    """``--targets a,b --targets c`` -> ``[a, b, c]`` (a ``re:`` pattern is never split)."""
    out: list[str] = []
    for value in values:
        if value.startswith("re:"):
            out.append(value)
        else:
            out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def parse_options(values: Iterable[str]) -> dict[str, str]:
    """``--option k=5 --option var_floor=1e-4`` -> ``{"k": "5", "var_floor": "1e-4"}`` (typed later)."""
    options: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got '{value}'", param_hint="'--option'")
        options[key.strip()] = val.strip()
    return options


def existing_file(path: str) -> str:
    """``path`` if it is a file, else a one-line FileFormatError (exit 1)."""
    if not Path(path).is_file():
        raise FileFormatError(f"no such file: {path}")
    return path


def sibling_output(path: str, tag: str) -> str:
    """``model.safetensors`` -> ``model-TAG.safetensors``, next to the input."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{tag}{p.suffix or '.safetensors'}"))


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings become one ``warning: ...`` line on stderr; deprecation noise from libraries is dropped."""
    if not issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        click.echo(f"warning: {message}", err=True)


class NormswapGroup(click.Group):
    """A click group whose every error is one line, ``Error: <message>``, with a meaningful exit code.

    :class:`NormswapError` exits with its class's code (1 failed operation, 2 bad usage); click's own
    usage errors exit 2 without the usage banner (``--help`` shows that)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except NormswapError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
