"""Read recipe YAML into a :class:`~normswap.recipe.schema.Recipe`; every problem is one line.

YAML is read only with a :class:`yaml.SafeLoader` subclass that refuses duplicate keys and reads
``3e-4`` as a number (plain PyYAML reads it as a string). The document is composed first, so every
dotted path keeps the line it came from; ``--set key.path=value`` overrides are applied to the
plain data before validation, and their errors say ``(from --set)`` instead of a line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from normswap.errors import RecipeError
from normswap.errors import one_line
from normswap.recipe import messages
from normswap.recipe.schema import SCHEMA_VERSION, Recipe, show_value

Loc = tuple[Any, ...]
MAX_VALUES = 10_000  # a recipe holds about a hundred; YAML aliases must not expand into billions (billion laughs)


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML loader: YAML 1.2-style floats (``1e-4``) and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {seen[key]})", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _walk(node: yaml.Node, path: Loc, lines: dict[Loc, int], ends: dict[Loc, int], name: str) -> None:
    """Record the line of every dotted path (the key's line; an item's own line) and refuse duplicates."""
    if len(lines) > MAX_VALUES:
        raise RecipeError(f"{name}: the recipe expands to more than {MAX_VALUES} values (nested YAML aliases?); a "
                          "recipe holds about a hundred")
    if isinstance(node, yaml.MappingNode):
        ends[path] = node.end_mark.line + 1
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key: Any = key_node.value
            if key_node.tag == "tag:yaml.org,2002:int":
                key = int(key) if key.lstrip("-+").isdigit() else key
            line = key_node.start_mark.line + 1
            if path + (key,) in lines:
                raise RecipeError(f"{name}: {messages.dotted(path + (key,))}: duplicate key "
                                  f"(first at line {lines[path + (key,)]}) (line {line})")
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, ends, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _walk(item, path + (index,), lines, ends, name)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if context and problem.startswith("but "):  # "expected a single document in the stream but found another document"
        problem = f"{context} {problem}"
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"


def _load(text: str, name: str, lines: dict[Loc, int], ends: dict[Loc, int]) -> Any:
    """YAML text -> plain data (None for an empty document), filling ``lines`` / ``ends`` (see :func:`_walk`); YAML
    problems, alias bombs and deep nesting are one RecipeError line."""
    try:
        loader = RecipeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters before any parsing
        raise RecipeError(f"{name}: {_yaml_problem(exc)}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        lines[()] = node.start_mark.line + 1
        _walk(node, (), lines, ends, name)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{name}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{name}: the YAML is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _compose(text: str, name: str) -> tuple[Any, dict[Loc, int], dict[Loc, int]]:
    """YAML text -> (plain data, path -> line, mapping path -> its last line)."""
    lines: dict[Loc, int] = {}
    ends: dict[Loc, int] = {}
    data = _load(text, name, lines, ends)
    if () not in lines:
        raise RecipeError(f"{name}: empty recipe (expected a mapping with the sections model, convert, finetune, output)")
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: expected a mapping of sections at the top level, got {show_value(data)} (line {lines[()]})")
    return data, lines, ends


def _set_path(item: str, name: str) -> tuple[Loc, Any]:
    """``'finetune.optimizer.lr=3e-4'`` -> (('finetune', 'optimizer', 'lr'), 0.0003), checked against the schema."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    item = one_line(item)  # shown in messages: a line break in an override must not break the one-line error
    if not sep or not key:
        raise RecipeError(f"{name}: --set {item}: expected KEY.PATH=VALUE, e.g. finetune.optimizer.lr=3e-4")
    parts = key.split(".")
    canonical: list[str] = []
    cls: Any = Recipe
    for depth, part in enumerate(parts):
        model = messages.model_class(cls)
        if model is None:
            bare, _ = messages.resolve(tuple(canonical))
            if getattr(bare, "__origin__", None) is dict and depth == len(parts) - 1:
                canonical.append(part)
                break
            raise RecipeError(f"{name}: --set {item}: '{canonical[-1]}' takes a value, not keys")
        fields = messages.fields_by_key(model)
        by_name = {n: (f.alias or n) for n, f in model.model_fields.items()}
        if part not in fields and part not in by_name:
            hint = messages.did_you_mean(part, fields)
            raise RecipeError(f"{name}: --set {item}: unknown key '{one_line(part)}'{hint}")
        key_name = part if part in fields else by_name[part]
        canonical.append(key_name)
        cls = fields[key_name].annotation
    value = _load(raw, f"{name}: --set {item}", {}, {}) if raw.strip() else None  # a file's limits apply
    return tuple(canonical), value


def _apply(data: dict[str, Any], overrides: Iterable[str], name: str) -> list[Loc]:
    done: list[Loc] = []
    for item in overrides:
        path, value = _set_path(item, name)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        done.append(path)
    return done


def _validate(data: dict[str, Any], name: str, lines: dict[Loc, int], ends: dict[Loc, int],
              overridden: list[Loc]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        found = messages.problems(exc.errors(include_url=False), name, lines, ends, overridden)
        first = found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
        raise RecipeError(first, found) from None


def parse_recipe(text: str, name: str = "<string>", overrides: Iterable[str] = ()) -> Recipe:
    """Parse recipe YAML ``text`` (``name`` is shown in errors), apply ``overrides``, validate."""
    data, lines, ends = _compose(text, name)
    overridden = _apply(data, overrides, name)
    return _validate(data, name, lines, ends, overridden)


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read and validate the recipe file ``path`` with ``overrides`` (``"dotted.path=value"`` strings)."""
    name = str(path)
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"{name}: is a directory, not a recipe file")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{name}: no such file") from None
    except OSError as exc:
        raise RecipeError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})") from None
    return parse_recipe(text, name, overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults included) as YAML that loads back to an equal Recipe."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (draft 2020-12) for editors, tagged with the schema version."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "x-normswap-schema-version": SCHEMA_VERSION, **schema}
    json.dumps(schema)  # must be plain JSON
    return schema
