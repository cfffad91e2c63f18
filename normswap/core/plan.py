"""The Plan: a pure, JSON-serialisable description of one conversion.

``find`` produces a Plan without touching the model; ``apply`` replays it by module name. A saved
model carries its Plan in the safetensors metadata, and ``load`` replays the same Plan on a freshly
built source model, so every field here must be plain JSON (str, int, float, bool, None, list, dict).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from normswap.errors import FileFormatError

PLAN_FORMAT = "normswap.plan"
PLAN_VERSION = 1

CONVERT = "convert"
SKIP = "skip"
# Written by ``normswap.export``: the variant's layer was folded into its neighbours for inference and the
# source module is back in place; ``apply`` rebuilds only what the fold left behind (``Variant.apply_folded``),
# so the exported file still loads strictly.
FOLDED = "folded"


@dataclass
class Site:
    """One place in a model that the plan rewrites (``action == "convert"``) or leaves (``"skip"``).

    Attributes:
        name: qualified module name of the module that is replaced (``features.0.1``).
        source_type: qualified class name of that module (``torch.nn.BatchNorm2d``).
        variant: registry name of the variant that rewrites it.
        action: ``"convert"`` or ``"skip"``.
        reason: why a site is skipped, or a note on how it is converted.
        pattern: the structural pattern found (``bn``, ``conv->bn``, ``bn->act``, ``ln``, ...).
        path: which finder saw it: ``fx`` (graph) or ``walk`` (module walk fallback).
        absorbs: names of further modules folded into this one and replaced by ``nn.Identity``.
        config: the variant's config for this site (JSON), strength included.
        facts: what the finder established (producer, consumers, activation, shape, ...).
        opt_in: the site is converted only when a target pattern names it explicitly (plain Linear
            and Conv layers for PatchNorm, say); without one it is skipped with that reason.
    """

    name: str
    source_type: str
    variant: str
    action: str = CONVERT
    reason: str = ""
    pattern: str = ""
    path: str = "fx"
    absorbs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    opt_in: bool = False

    @property
    def converted(self) -> bool:
        return self.action == CONVERT


@dataclass
class Plan:
    """Everything needed to replay a conversion on the same architecture."""

    variant: str
    strength: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    trace_path: str = "fx"
    trace_error: str | None = None
    sites: list[Site] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def converted(self) -> list[Site]:
        """The sites that are rewritten."""
        return [s for s in self.sites if s.converted]

    @property
    def skipped(self) -> list[Site]:
        """The sites left alone, each with its reason."""
        return [s for s in self.sites if not s.converted]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": PLAN_FORMAT, **d}
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise FileFormatError("the metadata holds no normswap plan (missing or wrong 'format')")
        version = d.get("version")
        if not isinstance(version, int):
            raise FileFormatError("the normswap plan has no integer 'version'")
        if version > PLAN_VERSION:
            raise FileFormatError(
                f"the plan is format version {version}, newer than this normswap supports "
                f"({PLAN_VERSION}); upgrade normswap to load it"
            )
        try:
            sites = [Site(**s) for s in d.get("sites", [])]
            fields = {k: v for k, v in d.items() if k not in ("format", "sites")}
            return cls(sites=sites, **fields)
        except TypeError as exc:
            raise FileFormatError(f"the normswap plan is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"the normswap plan is not valid JSON: {exc}") from None
        return cls.from_dict(d)
