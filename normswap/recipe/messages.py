"""Pydantic's error list -> one line per problem: ``FILE: dotted.path: message (line N)``.

The messages are written here from each error's ``type``, ``loc``, ``ctx`` and the schema itself
(full ranges, allowed values, valid keys for a did-you-mean); pydantic's own text is only a
fallback for an error type not listed here.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Iterable, Sequence, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from normswap.errors import one_line
from normswap.recipe.schema import SCHEMA_VERSION, Recipe, RuleError, show_value

Loc = tuple[Any, ...]

_EXPECTED = {
    "float_type": "a number", "float_parsing": "a number", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "an integer", "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "finite_number": "a finite number",
}
_RANGE_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def dotted(loc: Iterable[Any]) -> str:
    """``('data', 'mean', 0)`` -> ``data.mean[0]`` (control characters escaped)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return one_line(out)  # a key with a line break must not break the one-line error


def _rule_loc(field: str) -> Loc:
    """``'levels[2]'`` -> ``('levels', 2)``; ``''`` -> ``()``."""
    loc: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", field):
        loc.append(int(index) if index else name)
    return tuple(loc)


def strip_annotation(annotation: Any) -> tuple[Any, list[Any]]:
    """Remove Optional[...] and Annotated[...]; return (bare annotation, constraint metadata)."""
    meta: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                meta.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, meta
            annotation = args[0]
        else:
            return annotation, meta


def model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind an annotation (Optional and Annotated removed), else None."""
    bare, _ = strip_annotation(annotation)
    return bare if isinstance(bare, type) and issubclass(bare, BaseModel) else None


def fields_by_key(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields under the keys a recipe uses (the alias where there is one)."""
    return {(f.alias or n): f for n, f in cls.model_fields.items()}


def resolve(loc: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The schema's (annotation, constraints) at ``loc`` in a Recipe; (None, []) where it leaves the schema."""
    annotation: Any = Recipe
    meta: list[Any] = []
    for part in loc:
        bare, _ = strip_annotation(annotation)
        cls = model_class(bare)
        if cls is not None:
            field = fields_by_key(cls).get(part) or cls.model_fields.get(part)
            if field is None:
                return None, []
            annotation, meta = field.annotation, list(field.metadata)
            continue
        origin, args = get_origin(bare), get_args(bare)
        if origin in (list, tuple) and isinstance(part, int) and args:
            item = args[part] if origin is tuple and part < len(args) and args[-1] is not Ellipsis else args[0]
        elif origin is dict and args:
            item = args[1]
        else:
            return None, []
        annotation, meta = strip_annotation(item)
    bare, more = strip_annotation(annotation)
    return bare, meta + more


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def range_text(meta: list[Any], ctx: dict[str, Any]) -> str:
    """``must be in [0, 1)``, ``must be > 0``... from the schema's constraints (or the error's ctx)."""
    bounds = {k: getattr(m, k) for m in meta for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    bounds = bounds or {k: ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"must be in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"must be {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return "is out of range"


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'optimizer'?)`` for the closest choice, or ``''``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe(error: dict[str, Any]) -> tuple[Loc, str, str | None]:
    """One pydantic error -> (loc, message, suggested key for an unknown key)."""
    loc: Loc = tuple(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    got = show_value(value)
    if "[key]" in loc:
        return loc[: loc.index("[key]")], f"keys must be strings, got {got}", None
    if kind == "value_error" and isinstance(ctx.get("error"), RuleError):
        rule = ctx["error"]
        return loc + _rule_loc(rule.field), rule.message, None
    if kind == "extra_forbidden":
        parent = model_class(resolve(loc[:-1])[0])
        keys = list(fields_by_key(parent)) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
        if close:
            return loc, f"unknown key (did you mean '{close[0]}'?)", close[0]
        return loc, f"unknown key (valid keys: {', '.join(keys)})", None
    annotation, meta = resolve(loc)
    if kind == "missing":
        return loc, f"required {'section' if model_class(annotation) else 'field'} is missing", None
    if kind == "literal_error":
        if loc == ("version",):
            return loc, f"unsupported recipe version {got} (this normswap reads version {SCHEMA_VERSION})", None
        allowed = [str(a) for a in get_args(annotation)] if get_origin(annotation) is typing.Literal else []
        if allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            return loc, f"expected one of {', '.join(allowed)}, got {got}{hint}", None
    if kind in ("too_long", "too_short") and get_origin(annotation) is tuple:
        return loc, f"expected {len(get_args(annotation))} values, got {ctx.get('actual_length', '?')}", None
    if kind in ("too_long", "too_short"):
        return loc, f"expected at least {ctx.get('min_length', '?')} values, got {ctx.get('actual_length', '?')}", None
    if kind in _RANGE_TYPES:
        return loc, f"{range_text(meta, ctx)}, got {got}", None
    if kind in _EXPECTED:
        return loc, f"expected {_EXPECTED[kind]}, got {got}", None
    if kind == "option_value":
        return loc, error["msg"], None
    return loc, str(error.get("msg", kind)).splitlines()[0], None


def _under(loc: Loc, prefixes: Iterable[Loc]) -> bool:
    return any(loc[: len(p)] == p for p in prefixes)


def problems(errors: list[dict[str, Any]], name: str, lines: dict[Loc, int], ends: dict[Loc, int],
             overridden: Iterable[Loc] = ()) -> list[str]:
    """Every problem as one line, first in file order (``--set`` ones before the file's)."""
    overridden = list(overridden)
    described = [describe(e) + (e["type"],) for e in errors]
    suggested = {loc[:-1] + (key,) for loc, _, key, _ in described if key}
    rows: list[tuple[tuple[int, int, int], str]] = []
    for index, (loc, message, _, kind) in enumerate(described):
        if kind == "missing" and loc in suggested:
            continue  # the misspelt key already reported says it
        if _under(loc, overridden):
            rows.append(((0, 0, index), f"{name}: {dotted(loc)}: {message} (from --set)"))
            continue
        anchor = loc[:-1] if kind == "missing" else loc
        while anchor and anchor not in lines:
            anchor = anchor[:-1]
        line = lines.get(anchor, 1)
        order = ends.get(anchor, line) if kind == "missing" else line
        path = dotted(loc)
        rows.append(((1, order, index), f"{name}: {path + ': ' if path else ''}{message} (line {line})"))
    return [text for _, text in sorted(rows)]
