"""What a normswap file's metadata may say, checked before anything is built from it.

A ``.safetensors`` file is data from anywhere. Its model source and its Plan are validated here, and
every problem is one :class:`FileFormatError` line that names the file (exit 1):

- the source: a known kind; a known torchvision / timm name; for hf and custom code an absolute path,
  as normswap writes it; and only the builder kwargs of an allow-list, with their types and ranges.
  Options that enable code, read other files or reach the network (``trust_remote_code``, timm's
  ``checkpoint_path`` / ``pretrained_cfg_overlay``, torchvision's ``weights_backbone``, ...) are never
  taken from a file; a torchvision weights name is a name of that model's weights enum, no more;
- the Plan: every field of every site with its JSON type, registered variants, and each site's
  config in range (the variant's own ``validate``).

See docs/security.md for what normswap reads, imports and executes, and when.
"""

from __future__ import annotations

import math
import os
import re
import typing
from typing import TYPE_CHECKING, Any, Callable

from normswap.errors import FileFormatError, NormswapError, a_type, one_line
from normswap.compat import import_torchvision
from normswap.sources import KINDS, WEIGHT_SUFFIXES, SourceSpec, optional_module
from normswap.sources.weights import first_three
from normswap.core.plan import Plan

if TYPE_CHECKING:
    import torch
    from torch import nn

_PY_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MAX_TEXT = 4096


def _int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_int(1, 8192)(x) for x in v)


def _module_paths(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 100_000 and all(
        isinstance(x, str) and len(x) <= _MAX_TEXT and _MODULE_PATH.fullmatch(x) for x in v)


# The builder kwargs a file may carry: what normswap records (sources._tv_arch_kwargs, timm's num_classes) and a
# few plain architecture numbers. Anything else is refused; these never are accepted from a file:
NEVER = {
    "trust_remote_code": "it runs code that ships with a model",
    "weights": "it can download weights", "weights_backbone": "it can download weights",
    "pretrained": "it can download weights", "pretrained_backbone": "it can download weights",
    "checkpoint_path": "it reads another file", "pretrained_cfg": "it can read files or download",
    "pretrained_cfg_overlay": "it can read files or download", "cache_dir": "it reads and writes files",
    "revision": "it selects remote code", "code_revision": "it selects remote code",
}
SOURCE_KWARGS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "torchvision": {
        "num_classes": _int(1, 1_000_000), "num_keypoints": _int(1, 10_000), "image_size": _int(1, 8192),
        "input_size": _pair, "transform_input": _bool, "aux_logits": _bool, "init_weights": _bool,
        "aux_loss": _bool, "quantize": _bool, "backend": _one_of("fbgemm", "qnnpack", "x86"),
        "_frozen_bn": _module_paths, "dropout": _num(0.0, 1.0), "attention_dropout": _num(0.0, 1.0),
        "stochastic_depth_prob": _num(0.0, 1.0), "width_mult": _num(0.01, 16.0), "zero_init_residual": _bool,
        "groups": _int(1, 1024), "width_per_group": _int(1, 4096),
        "replace_stride_with_dilation": lambda v: isinstance(v, list) and len(v) == 3 and all(map(_bool, v)),
    },
    "timm": {
        "num_classes": _int(0, 1_000_000), "in_chans": _int(1, 1024), "drop_rate": _num(0.0, 1.0),
        "drop_path_rate": _num(0.0, 1.0), "global_pool": _one_of("", "avg", "max", "avgmax", "catavgmax", "token"),
    },
    "hf": {},  # nothing is passed to transformers from a file
}


def _json_plain(value: Any, depth: int = 0) -> bool:
    """JSON scalars, lists and str-keyed dicts, finite numbers, at most 32 levels deep."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_plain(v, depth + 1) for k, v in value.items())
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_kwargs(kind: str, kwargs: dict[str, Any], fail: Callable[[str], FileFormatError]) -> None:
    allowed = SOURCE_KWARGS.get(kind)
    for key, value in kwargs.items():
        if key in NEVER:
            raise fail(f"builder kwarg '{key}' is never taken from a file ({NEVER[key]})")
        if allowed is None:  # python / file: the user's factory kwargs, used only with --trust-source
            if not (isinstance(key, str) and key.isidentifier() and _json_plain(value)):
                raise fail(f"builder kwarg {_short(key)} is not a plain keyword with a JSON value")
            continue
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise fail(f"builder kwarg '{key}' is not allowed for a {kind} source (allowed: {known})")
        if not allowed[key](value):
            raise fail(f"builder kwarg '{key}' has a bad value {_short(value)}")


def _check_name(kind: str, name: str, fail: Callable[[str], FileFormatError]) -> str:
    """The canonical spec of a valid ``kind`` / ``name``."""
    if kind == "torchvision":
        if name not in import_torchvision().models.list_models():
            raise fail(f"unknown torchvision model {_short(name)}")
        return f"torchvision:{name}"
    if kind == "timm":
        timm = optional_module("timm", "timm")
        if not timm.is_model(name.split(".", 1)[0]):
            raise fail(f"unknown timm model {_short(name)}")
        return f"timm:{name}"
    if kind == "hf":
        if not os.path.isabs(name) or "\0" in name:
            raise fail(f"hf source {_short(name)} is not an absolute directory path (normswap writes absolute ones)")
        return f"hf:{name}"
    target, sep, attr = name.rpartition(":")
    if not sep or not _PY_NAME.fullmatch(attr):
        raise fail(f"{kind} source {_short(name)} is not MODULE:FACTORY")
    if kind == "python" and not _PY_NAME.fullmatch(target):
        raise fail(f"python source {_short(name)} does not name an importable module")
    if kind == "file" and not (os.path.isabs(target) and target.endswith(".py") and "\0" not in target):
        raise fail(f"file source {_short(name)} is not an absolute path to a .py file")
    return name


def _check_weights(kind: str, name: str, weights: Any, fail: Callable[[str], FileFormatError]) -> None:
    if weights is None or weights == "none":
        return
    if not isinstance(weights, str) or len(weights) > _MAX_TEXT or "\0" in weights:
        raise fail(f"weights {_short(weights)} is not a weights name or file path")
    if os.path.isabs(weights) and weights.lower().endswith(WEIGHT_SUFFIXES):
        return
    if kind == "torchvision":
        try:
            members = import_torchvision().models.get_model_weights(name).__members__
        except (ValueError, KeyError):
            members = {}
        if weights in members and weights != "DEFAULT":
            return
    raise fail(f"weights {_short(weights)} is neither a weights name of {name} nor an absolute weights file path")


def source_from_file(data: Any, path: str | os.PathLike) -> SourceSpec | None:
    """The model source recorded in file ``path``'s metadata, validated (module docstring); ``None`` if none."""
    if data is None:
        return None

    def fail(why: str) -> FileFormatError:
        return FileFormatError(one_line(f"{path}: refused model source in the file's metadata: {why}"))

    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    extra = sorted(set(data) - {"spec", "kind", "name", "weights", "kwargs"})
    if extra:
        raise fail(f"unknown field {_short(extra[0])}")
    kind, name, kwargs = data.get("kind"), data.get("name"), data.get("kwargs", {})
    kwargs = {} if kwargs is None else kwargs
    if kind not in KINDS:
        raise fail(f"unknown kind {_short(kind)} (known: {', '.join(KINDS)})")
    if not isinstance(name, str) or not name or len(name) > _MAX_TEXT:
        raise fail(f"name {_short(name)} is not a model name")
    if not isinstance(data.get("spec", ""), str) or not isinstance(kwargs, dict):
        raise fail("'spec' must be a string and 'kwargs' an object")
    spec = _check_name(kind, name, fail)
    _check_weights(kind, name, data.get("weights"), fail)
    _check_kwargs(kind, kwargs, fail)
    return SourceSpec(spec, kind, name, data.get("weights"), dict(kwargs))


# ------------------------------------------------------------------------------------------------ plan
_SITE_TYPES: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str), "source_type": lambda v: isinstance(v, str),
    "variant": lambda v: isinstance(v, str), "action": _one_of("convert", "skip", "folded"),
    "reason": lambda v: isinstance(v, str), "pattern": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, str), "opt_in": _bool,
    "absorbs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "config": lambda v: isinstance(v, dict) and _json_plain(v), "facts": lambda v: isinstance(v, dict) and _json_plain(v),
}
_PLAN_TYPES: dict[str, Callable[[Any], bool]] = {
    "variant": lambda v: isinstance(v, str), "strength": _num(0.0, 1.0),
    "options": lambda v: isinstance(v, dict) and _json_plain(v),
    "targets": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "exclude": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "trace_path": _one_of("fx", "walk"), "trace_error": lambda v: v is None or isinstance(v, str),
    "version": _int(0, 1 << 30), "sites": lambda v: isinstance(v, list), "format": lambda v: isinstance(v, str),
}


def _config_type_ok(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _check_config(where: str, variant: str, config: dict[str, Any], fail: Callable[[str], FileFormatError]) -> None:
    import dataclasses

    from normswap.variants import registry

    try:
        cls = registry.get(variant)
    except NormswapError as exc:
        raise fail(f"{where}: {exc}") from None
    config_class = cls.config_class
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in config and not _config_type_ok(config[f.name], hints.get(f.name)):
            raise fail(f"{where}: config '{f.name}' has a bad value {_short(config[f.name])}")
    try:
        config_class.from_dict(config).validate(variant)
    except NormswapError as exc:
        raise fail(f"{where}: {exc}") from None


def plan_from_file(data: Any, path: str | os.PathLike) -> Plan:
    """The Plan recorded in file ``path``'s metadata, every field type-checked and every site's config
    validated by its variant; any problem is one FileFormatError naming the file."""

    def fail(why: str) -> FileFormatError:
        return FileFormatError(one_line(f"{path}: bad plan in the file's metadata: {why}"))

    if isinstance(data, dict):
        for key, check in _PLAN_TYPES.items():
            if key in data and not check(data[key]):
                raise fail(f"field '{key}' has a bad value {_short(data[key])}")
        for i, site in enumerate(data.get("sites") or []):
            if not isinstance(site, dict):
                raise fail(f"site {i} is {a_type(site)}, not an object")
            for key, check in _SITE_TYPES.items():
                if key in site and not check(site[key]):
                    raise fail(f"site {i} ({_short(site.get('name'))}): field '{key}' has a bad value "
                               f"{_short(site[key])}")
    try:
        plan = Plan.from_dict(data)
    except FileFormatError as exc:
        raise FileFormatError(one_line(f"{path}: {exc}")) from None
    for site in plan.sites:
        if site.action == "skip":
            continue
        _check_config(f"site '{site.name}'", site.variant, site.config, fail)
    _check_config("plan", plan.variant, {}, fail)
    return plan


def replay(path: str | os.PathLike, model: "nn.Module", plan: Plan, tensors: dict[str, "torch.Tensor"], *,
           inplace: bool = False, complete: bool = False) -> "nn.Module":
    """``plan`` applied to a copy of ``model`` (to ``model`` itself with ``inplace``: a model built for this load
    alone) and the file's ``tensors`` loaded strictly. Whatever a crafted file makes the variants or the load trip
    over is one FileFormatError naming ``path``. ``complete``: ``model``'s values are placeholders (built without
    initialisation), so the file must hold every key (no older layout a module completes itself)."""
    from normswap.surgery.apply import apply_plan
    from normswap.sources.weights import first_line

    try:
        converted = apply_plan(model, plan, inplace=inplace)
    except NormswapError as exc:  # FileFormatError, or an OptionError / UnknownVariantError from a site
        raise FileFormatError(one_line(f"{path}: {exc}")) from None
    except Exception as exc:  # noqa: BLE001  (the plan comes from a file: no input may escape as a traceback)
        raise FileFormatError(one_line(f"{path}: the plan does not fit the rebuilt model "
                                       f"({type(exc).__name__}: {first_line(exc)})")) from None
    own = converted.state_dict()
    miss = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    if miss and complete:
        raise FileFormatError(one_line(f"{path} does not hold every tensor of the model ({first_three(miss)})"))
    if miss and not extra:  # a module may accept an older layout in _load_from_state_dict (ANAct's strength)
        try:
            miss = converted.load_state_dict(tensors, strict=False).missing_keys
        except Exception:  # noqa: BLE001  (a bad tensor: the checks below name it)
            pass
    if miss or extra:
        raise FileFormatError(one_line(
            f"{path} does not fit the rebuilt model: {len(miss)} missing key(s) ({first_three(miss)}), "
            f"{len(extra)} unexpected key(s) ({first_three(extra)})"))
    shapes = [f"'{k}' is {_shape(v)} in the file, {_shape(own[k])} in the model"
              for k, v in tensors.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise FileFormatError(one_line(f"{path} does not fit the rebuilt model: tensor {shapes[0]}{more}"))
    held = converted.state_dict(keep_vars=True)
    for key, value in tensors.items():  # the file's floating dtypes win: a bfloat16 model loads as bfloat16
        if value.is_floating_point() and held[key].is_floating_point() and held[key].dtype != value.dtype:
            held[key].data = held[key].data.to(value.dtype)
    try:
        converted.load_state_dict(tensors, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise FileFormatError(one_line(f"{path}: its tensors do not load into the rebuilt model "
                                       f"({type(exc).__name__}: {first_line(exc)})")) from None
    return converted


def _shape(t: "torch.Tensor") -> str:
    return "x".join(map(str, t.shape)) or "a scalar"
