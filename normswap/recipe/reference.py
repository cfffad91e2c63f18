"""The schema reference in docs/recipes.md, generated from the models so it cannot drift.

``python -m normswap.recipe.reference docs/recipes.md`` rewrites the text between the
``<!-- schema-reference:begin -->`` and ``<!-- schema-reference:end -->`` markers;
without an argument it prints the reference.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from normswap.recipe import messages
from normswap.recipe.schema import Recipe

BEGIN, END = "<!-- schema-reference:begin -->", "<!-- schema-reference:end -->"
_NAMES = {str: "string", int: "integer", float: "number", bool: "true/false"}


def _type(annotation: Any, meta: list[Any]) -> str:
    """``number in (0, 1)``, ``integer >= 1 or null``, ``list of numbers``, ``one of a, b``..."""
    nullable = type(None) in get_args(annotation)
    bare, more = messages.strip_annotation(annotation)
    meta = meta + more
    origin, args = get_origin(bare), get_args(bare)
    if origin is typing.Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in args) if len(args) > 1 else f"`{args[0]}`"
    elif origin is list:
        item, item_meta = messages.strip_annotation(args[0])
        text = f"list of {_NAMES.get(item, 'value')}s"
        if item_meta:
            text += f" (each {messages.range_text(item_meta, {}).replace('must be ', '')})"
    elif origin is tuple:
        text = f"[{', '.join(_type(*messages.strip_annotation(a)) for a in args)}]"
    elif origin is dict:
        text = "mapping of name to string, number or true/false"
    elif isinstance(bare, type) and issubclass(bare, BaseModel):
        text = "section"
    else:
        text = _NAMES.get(bare, getattr(bare, "__name__", str(bare)))
    if any(getattr(m, k, None) is not None for m in meta for k in ("ge", "gt", "le", "lt")):
        text += " " + messages.range_text(meta, {}).replace("must be ", "")
    return text + (" or null" if nullable else "")


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value}`"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(repr(v) for v in value)}]`"
    return f"`{value!r}`" if isinstance(value, float) else f"`{value}`"


def _section(cls: type[BaseModel], path: str, out: list[str]) -> None:
    title = f"`{path}`" if path else "Top level"
    out += [f"### {title}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
            "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for key, field in messages.fields_by_key(cls).items():
        sub = messages.model_class(field.annotation)
        if sub is not None:
            nested.append((sub, f"{path}.{key}" if path else key))
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {_type(field.annotation, list(field.metadata))} | {_default(field)} | {description} |")
    out.append("")
    for sub, sub_path in nested:
        _section(sub, sub_path, out)


def reference() -> str:
    """Markdown tables of every section and field of the recipe schema."""
    out: list[str] = []
    _section(Recipe, "", out)
    return "\n".join(out).rstrip() + "\n"


def rewrite(path: str | Path) -> None:
    """Replace the generated block of the markdown file ``path`` with the current reference."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"{p}: no {BEGIN} ... {END} block")
    p.write_text(f"{head}{BEGIN}\n{reference()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        rewrite(sys.argv[1])
    else:
        sys.stdout.write(reference())
