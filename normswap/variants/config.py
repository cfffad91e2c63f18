"""A variant's typed config: the options a user passes (``--option k=3``) and the plan stores per site."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from normswap.errors import OptionError
from normswap.variants.strength import check_strength

__all__ = ["VariantConfig", "parse_option"]


def parse_option(value: Any, hint: Any, key: str, variant: str) -> Any:
    """Convert a CLI string (or a JSON value) to the config field's type, or raise OptionError."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise OptionError(
                f"option '{key}' of variant '{variant}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    elif hint in (int, float):
        if isinstance(value, bool):
            raise OptionError(f"option '{key}' of variant '{variant}' expects {hint.__name__}, got {value!r}")
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value) if not isinstance(value, str) else hint(value.strip())
        except (TypeError, ValueError):
            pass
    elif hint is str:
        return str(value)
    else:
        return value
    raise OptionError(f"option '{key}' of variant '{variant}' expects {getattr(hint, '__name__', hint)}, got {value!r}")


@dataclass
class VariantConfig:
    """Base of every variant's config. ``strength`` is the uniform homotopy parameter in [0, 1]."""

    strength: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, strength: float, variant: str) -> "VariantConfig":
        """Validate user options strictly (unknown keys and bad values are errors) and build the config."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "strength"]
        values: dict[str, Any] = {}
        for key, value in (options or {}).items():
            if key not in names:
                known = ", ".join(names) if names else "none"
                raise OptionError(f"unknown option {key!r} for variant '{variant}'; valid options: {known}")
            values[key] = parse_option(value, hints[key], key, variant)
        config = cls(strength=check_strength(parse_option(strength, float, "strength", variant)), **values)
        config.validate(variant)
        return config

    def validate(self, variant: str) -> None:
        """Range checks; raise OptionError with a one-line message. Subclasses call ``super().validate``
        (plans read from a file are validated too, not only user options)."""
        check_strength(self.strength)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VariantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
