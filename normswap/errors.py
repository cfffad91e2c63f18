"""User-facing errors. Every message here is one line that says what went wrong and what to do.

The CLI prints ``Error: <message>`` and exits with the class's ``exit_code``: 1 for an operation
that failed, 2 for bad usage (an unknown name, a malformed option).
"""

from __future__ import annotations


class NormswapError(Exception):
    """Base class of every error normswap raises on purpose; the message is shown to the user."""

    exit_code = 1


class UsageError(NormswapError):
    """The request itself is malformed: an unknown name, a bad option value, a conflicting flag."""

    exit_code = 2


class UnknownVariantError(UsageError):
    """A variant name that the registry does not know."""


class UnknownModelError(UsageError):
    """A model name that no source knows."""


class OptionError(UsageError):
    """An option key or value that a variant's config rejects."""


class TargetError(UsageError):
    """A target/exclude pattern that matches nothing, or a target set that leaves nothing to convert."""


class WeightsError(NormswapError):
    """Weights could not be obtained or do not fit the architecture."""


class TraceError(NormswapError):
    """torch.fx could not trace the model and ``strict_trace`` forbids the module-walk fallback."""


class VerificationError(NormswapError):
    """A conversion that claims an exact start does not reproduce the original model."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class FileFormatError(NormswapError):
    """A normswap file that is truncated, corrupted, or written by an incompatible version."""


class DataError(NormswapError):
    """Data that cannot be used with this model: non-finite values, inputs of the wrong shape, labels
    outside the model's classes. The message names the data."""


class OutputError(NormswapError):
    """An output path that exists (without force) or cannot be written."""


class RecipeError(UsageError):
    """A recipe file (or a ``--set`` override) that cannot be read or does not fit the schema.

    The message is the first problem, one line (``FILE: dotted.path: message (line N)``), plus
    ``(and N more)``; ``problems`` holds every problem's line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def a_type(value: object) -> str:
    """``value``'s type name with its article: ``an int``, ``a list``."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
