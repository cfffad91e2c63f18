"""Model sources: a spec string -> an ``nn.Module`` with weights; :func:`rebuild` -> the same one without.

Specs: ``resnet50`` / ``torchvision:resnet50``, ``timm:NAME`` (``normswap[timm]``), ``hf:DIR`` (a local
``save_pretrained`` directory, ``normswap[hf]``), ``pkg.module:factory``, ``path/to/file.py:factory``.
Weights: ``None`` = the source's own pretrained weights (torchvision ``DEFAULT``, timm ``pretrained=True``,
the hf directory's weights, a factory's own init); a torchvision weights name (``IMAGENET1K_V1``);
``"none"`` = random init, announced by a :class:`RandomInitWarning` (the CLI shows warnings on stderr);
or a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, loaded strictly. Pickles are only read with
``torch.load(weights_only=True)``; :func:`rebuild` never downloads, and runs user code only when allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.compat import import_torchvision
from normswap.errors import (FileFormatError, a_type, NormswapError, UnknownModelError, UsageError,
                             WeightsError)
from normswap.sources.hf import hf_build
from normswap.sources.libs import download_errors, optional_module
from normswap.sources.weights import first_line as _first_line
from normswap.sources.weights import load_weights_file

KINDS = ("torchvision", "timm", "hf", "python", "file")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_PY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_OFFLINE_HINT = "this machine may be offline: pass --weights FILE (.safetensors/.pt)"


class RandomInitWarning(UserWarning):
    """Issued by :func:`load_model` when ``weights="none"`` leaves a model randomly initialised."""


@dataclass
class SourceSpec:
    """A parsed model source, JSON-able so that a saved file can :func:`rebuild` its architecture.

    ``spec`` is normalised (``torchvision:mobilenet_v2``, ``hf:/abs/dir``, ``/abs/m.py:make``); ``kind`` one of
    :data:`KINDS`; ``name`` the model name, hf directory, or ``module:factory`` / ``/abs/file.py:factory``;
    ``weights`` ``None`` (the source's own), a torchvision weights name (``DEFAULT`` resolved, e.g.
    ``IMAGENET1K_V2``), ``"none"`` or an absolute file path; ``kwargs`` the builder kwargs, including what a
    pretrained torchvision builder changes (``num_classes``, ``image_size``, ``aux_logits``, ...).
    """

    spec: str
    kind: str
    name: str
    weights: str | None = None
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for file metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "SourceSpec":
        """Inverse of :meth:`to_dict`; a malformed dict raises :class:`FileFormatError`."""
        keys = {"spec", "kind", "name", "weights", "kwargs"}
        if not isinstance(data, dict) or not {"spec", "kind", "name"} <= set(data) or set(data) - keys \
                or data["kind"] not in KINDS or not isinstance(data.get("kwargs", {}), dict):
            raise FileFormatError(f"malformed model source in file metadata: {str(data)[:120]}")
        return cls(data["spec"], data["kind"], data["name"], data.get("weights"), dict(data.get("kwargs") or {}))


# ----------------------------------------------------------------------------------------- parsing
_tv = import_torchvision


def _unknown(name: str, choices: list[str], label: str, where: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return UnknownModelError(f"unknown {label} '{name}'{hint}; see {where}")


def parse_spec(spec: str) -> SourceSpec:
    """Parse a model spec into a :class:`SourceSpec` (no model is built; names are checked)."""
    if isinstance(spec, SourceSpec):
        return spec
    text = str(spec).strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix == "torchvision":
        return _parse_tv(rest.strip())
    if sep and prefix == "timm":
        timm, name = optional_module("timm", "timm"), rest.strip()
        if not timm.is_model(name.split(".", 1)[0]):
            raise _unknown(name.split(".", 1)[0], timm.list_models(), "timm model", "timm.list_models()")
        return SourceSpec(f"timm:{name}", "timm", name)
    if sep and prefix == "hf":
        path = Path(rest.strip()).expanduser()
        if not (path / "config.json").is_file():
            raise UsageError(f"hf source '{rest.strip()}' is not a local directory holding config.json: "
                             "normswap loads Hugging Face models from a save_pretrained directory (download it first)")
        return SourceSpec(f"hf:{path.resolve()}", "hf", str(path.resolve()))
    if sep:
        left, _, attr = text.rpartition(":")
        if not _PY_RE.fullmatch(attr):
            raise UsageError(f"malformed model spec '{text}': expected NAME, torchvision:NAME, timm:NAME, hf:DIR, "
                             "pkg.module:factory or path/to/file.py:factory")
        if left.endswith(".py"):
            path = Path(left).expanduser()
            if not path.is_file():
                raise UsageError(f"source file {left} not found (spec '{text}')")
            name = f"{path.resolve()}:{attr}"
            return SourceSpec(name, "file", name)
        if _PY_RE.fullmatch(left):
            return SourceSpec(text, "python", text)
        raise UsageError(f"malformed model spec '{text}': expected pkg.module:factory or path/to/file.py:factory")
    return _parse_tv(text)


def _parse_tv(name: str) -> SourceSpec:
    tv = _tv()
    known = tv.models.list_models()
    if name.lower() not in known:
        err = _unknown(name, known, "model", "torchvision.models.list_models()")
        if importlib.util.find_spec("timm") and optional_module("timm", "timm").is_model(name):
            err = UnknownModelError(f"{err} (timm has it: use 'timm:{name}')")
        raise err
    return SourceSpec(f"torchvision:{name.lower()}", "torchvision", name.lower())


# ----------------------------------------------------------------------------------------- builders
def _tv_build(name: str, weights: Any, kwargs: dict) -> nn.Module:
    """``get_model`` that never fetches backbone weights; ``_frozen_bn`` names BatchNorm2d to freeze (detection)."""
    tv = _tv()
    frozen = kwargs.get("_frozen_bn", []) if weights is None else []
    kwargs = {k: v for k, v in kwargs.items() if k != "_frozen_bn"}
    params = inspect.signature(tv.models.get_model_builder(name)).parameters
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)
    if "quantize" in params and weights is not None:
        kwargs.setdefault("quantize", True)
    model = tv.models.get_model(name, weights=weights, **kwargs)
    for path in frozen:
        parent, _, leaf = path.rpartition(".")
        bn = model.get_submodule(path)
        setattr(model.get_submodule(parent), leaf, tv.ops.misc.FrozenBatchNorm2d(bn.num_features, eps=bn.eps))
    return model


def _tv_arch_kwargs(name: str, w: Any, kwargs: dict, model: nn.Module | None = None) -> dict:
    """The kwargs under which ``_tv_build(name, None, ...)`` rebuilds the architecture built with weights ``w``."""
    out = dict(kwargs)
    builder = _tv().models.get_model_builder(name)
    module, params = builder.__module__, inspect.signature(builder).parameters
    if "categories" in w.meta and w.meta["categories"] is not None:
        out["num_classes"] = len(w.meta["categories"])
    if "keypoint_names" in w.meta:
        out["num_keypoints"] = len(w.meta["keypoint_names"])
    if module.endswith("vision_transformer"):
        out["image_size"] = w.meta["min_size"][0]
    if module.endswith("maxvit"):
        out["input_size"] = list(w.meta["min_size"])
    if name.removeprefix("quantized_") in ("inception_v3", "googlenet"):  # quantized ones drop aux by default
        out.setdefault("transform_input", True)
        out["aux_logits"] = kwargs.get("aux_logits", name == "inception_v3")
        out["init_weights"] = False
    if ".segmentation." in module and "aux_loss" in params:
        out["aux_loss"] = True
    if "quantize" in params:
        out.update(quantize=True, **({"backend": w.meta["backend"]} if "backend" in w.meta else {}))
    frozen = [n for n, m in (model.named_modules() if model is not None else ()) if type(m).__name__ == "FrozenBatchNorm2d"]
    if frozen:  # detection builders freeze the backbone's BatchNorm only when given weights
        out["_frozen_bn"] = frozen
    return out


def _tv_weights(source: SourceSpec, weights: str) -> Any:
    enum = _tv().models.get_model_weights(source.name)
    names = ["DEFAULT", *(n for n in enum.__members__ if n != "DEFAULT")]
    match = next((n for n in names if n.lower() == weights.lower()), None)
    if match is None:
        raise UsageError(f"unknown weights '{weights}' for {source.spec}; valid: {', '.join(names)}, "
                         "none (random init), or a weights file (.safetensors/.pt)")
    return enum[match]


def cached_weights(name: str) -> list[str]:
    """Names of torchvision model ``name``'s weights that are in torch's hub cache (load with no download)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        enum = _tv().models.get_model_weights(name)
    except (ValueError, KeyError):
        return []
    return [n for n, v in enum.__members__.items() if (hub / os.path.basename(v.url)).is_file()]


def _call_factory(source: SourceSpec) -> nn.Module:
    """Import (or exec, for ``file``) the user's module, then call ``factory(**kwargs)``; expect an nn.Module."""
    target, _, attr = source.name.rpartition(":")
    if source.kind == "file":
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"source file {target} not found (spec '{source.spec}')")
        mod_name = "_normswap_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]  # private, per path
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:
                del sys.modules[mod_name]
                raise NormswapError(f"cannot load {target}: {type(exc).__name__}: {_first_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise UsageError(f"cannot import module '{target}' for source '{source.spec}': "
                             f"{type(exc).__name__}: {_first_line(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UsageError(f"'{target}' has no attribute '{attr}'{hint} (source '{source.spec}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"'{source.spec}' is not callable (it is {a_type(obj)}); name a function or class "
                         "that returns an nn.Module")
    try:
        model = obj(**source.kwargs)
    except Exception as exc:
        raise NormswapError(f"factory '{source.spec}' failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise NormswapError(f"factory '{source.spec}' returned {a_type(model)}, not a torch.nn.Module")
    return model


def _guard_build(label: str, build: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Run a library builder; bad builder kwargs (TypeError / ValueError) become one UsageError line."""
    try:
        return build(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build {label}: {type(exc).__name__}: {_first_line(exc)}") from None


def _arch(source: SourceSpec, allow_code: bool = False) -> nn.Module:
    """The architecture with no weights loaded and nothing downloaded (user code must be allowed first)."""
    if source.kind == "torchvision":
        return _tv_build(source.name, None, source.kwargs)
    if source.kind == "timm":
        return optional_module("timm", "timm").create_model(source.name, pretrained=False, **source.kwargs)
    if source.kind == "hf":
        return hf_build(source.name, source.kwargs, pretrained=False, allow_code=allow_code)
    return _call_factory(source)


def load_model(spec: str | SourceSpec, weights: str | None = None, *, kwargs: dict | None = None,
               allow_code: bool = False) -> tuple[nn.Module, SourceSpec]:
    """Build ``spec`` in eval mode with ``weights`` (module docstring) and ``kwargs`` for its builder.

    ``allow_code`` lets an hf directory that ships its own code (:func:`hf_custom_code`) run it; a
    ``pkg.mod:factory`` / ``file.py:factory`` spec is code the caller named, and runs regardless.

    Returns the model and the :class:`SourceSpec` to record (weights and architecture kwargs filled in)
    for :func:`rebuild`. ``"none"`` issues a :class:`RandomInitWarning`; failures are one-line NormswapErrors.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    weights = parsed.weights if weights is None else weights
    merged = {**parsed.kwargs, **(kwargs or {})}
    try:
        json.dumps(merged)
    except TypeError as exc:
        raise UsageError(f"builder kwargs must be JSON-able (they are saved in the file): {exc}") from None
    source = SourceSpec(parsed.spec, parsed.kind, parsed.name, None, merged)
    label = source.spec
    is_none = weights is not None and weights.strip().lower() == "none"
    is_file = weights is not None and not is_none and (weights.lower().endswith(WEIGHT_SUFFIXES) or "/" in weights
                                                       or os.sep in weights or os.path.isfile(weights))
    if is_file:
        source.weights = os.path.abspath(weights)
    elif weights is not None and not is_none and source.kind != "torchvision":
        raise UsageError(f"unknown weights '{weights}' for {label}: pass none (random init) or a weights file "
                         "(.safetensors/.pt)" + (", or a pretrained tag in the name (timm:NAME.TAG)"
                                                  if source.kind == "timm" else ""))
    if source.kind in ("python", "file"):
        model = _call_factory(source)
        source.weights = source.weights if is_file else weights
    elif is_none or is_file:
        model = _guard_build(label, _arch, source, allow_code)
        source.weights = source.weights if is_file else "none"
        if is_none:
            warnings.warn(RandomInitWarning(f"{label} has random weights (--weights none): its outputs mean nothing "
                                            "until it is trained"), stacklevel=2)
    elif source.kind == "torchvision":
        w = _tv_weights(source, weights or "DEFAULT")
        derived = _tv_arch_kwargs(source.name, w, {})  # recorded by an earlier load: the builder sets them itself
        try:
            model = _guard_build(label, _tv_build, source.name, w,
                                 {k: v for k, v in merged.items() if k not in derived or derived[k] != v})
        except download_errors() as exc:
            cached = cached_weights(source.name)
            also = f", a cached weights name ({', '.join(cached)})" if cached else ""
            raise WeightsError(f"could not download the {weights or 'DEFAULT'} weights for {label} ({w}): "
                               f"{_first_line(exc)}; {_OFFLINE_HINT}{also}, or --weights none for random init"
                               ) from None
        source.weights, source.kwargs = w.name, _tv_arch_kwargs(source.name, w, merged, model)
    elif source.kind == "timm":
        try:
            model = _guard_build(label, optional_module("timm", "timm").create_model, source.name, pretrained=True, **merged)
        except download_errors() as exc:
            raise WeightsError(f"could not download the pretrained weights for {label}: {_first_line(exc)}; "
                               f"{_OFFLINE_HINT}, or --weights none for random init") from None
        if isinstance(getattr(model, "num_classes", None), int):
            source.kwargs = {**merged, "num_classes": model.num_classes}
    else:
        model = hf_build(source.name, source.kwargs, pretrained=True, allow_code=allow_code)
    if is_file:
        load_weights_file(model, weights, label)
    return model.eval(), source


def rebuild(source: SourceSpec, allow_code: bool = False) -> nn.Module:
    """The architecture of ``source`` in eval mode, with no weights downloaded or loaded.

    ``python`` / ``file`` sources run user code, which a file's metadata must not trigger on its own:
    without ``allow_code=True`` they raise :class:`NormswapError`."""
    if source.kind in ("python", "file") and not allow_code:
        raise NormswapError(f"this file was made from custom code '{source.spec}'; normswap does not run code named "
                            "inside a file: pass the model (normswap.load(path, model=...)) or allow it explicitly "
                            "(--trust-source)")
    return _guard_build(source.spec, _arch, source, allow_code).eval()

