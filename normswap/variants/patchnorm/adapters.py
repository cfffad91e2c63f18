"""PatchNorm's adapters: which source classes it reads and how, the Conv/Linear -> BatchNorm pair rules, the
site proposals, and the module that keeps a folded norm + activation layer's activation.

An adapter maps a class's qualified name to a *kind*, which says how PatchNorm reads an instance:

============================  ==================================================================================
kind                          the class's forward must be
============================  ==================================================================================
``linear``                    ``nn.Linear``'s (``F.linear`` of ``weight`` and ``bias``)
``conv``                      ``nn.ConvNd``'s (its stride, padding, dilation, groups and padding_mode)
``conv_same``                 TF-style "same" zero padding computed from each input's size, then the conv with no
                              padding of its own (timm ``Conv2dSame``; EfficientNet-PyTorch's dynamic conv)
``conv_static_same``          its ``static_padding`` child (``nn.ZeroPad2d`` or ``nn.Identity``), then the conv
                              (EfficientNet-PyTorch's ``Conv2dStaticSamePadding``)
``bn``                        ``F.batch_norm`` with its running statistics in eval mode (``nn.BatchNormNd``'s)
``bn_act``                    ``bn``, then its ``drop`` and ``act`` children (timm ``BatchNormAct2d``)
``frozen_bn``                 ``x * scale + shift`` from fixed ``weight``/``bias``/``running_*`` buffers
                              (torchvision ``FrozenBatchNorm2d``)
============================  ==================================================================================

A norm of a ``bn*`` kind folds into the Conv/Linear feeding it (:func:`normswap.variants.patchnorm.layer.fold_batchnorm`).
A ``bn_act`` norm is then replaced by a :class:`NormActTail` holding only its ``drop`` and ``act`` (not by
``nn.Identity``), so the activation still follows the PatchNorm layer and strength 0 is exact.
:func:`register_adapter` adds a class; the plan of a pair whose class has none says which class and how.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError, OptionError
from normswap.core.plan import CONVERT, SKIP, Site
from normswap.core.kinds import qualname
from normswap.variants.base import share_tensors
from normswap.variants.config import VariantConfig

__all__ = ["ADAPTERS", "KINDS", "NormActTail", "register_adapter"]

LINEAR = "torch.nn.modules.linear.Linear"
CONV_KINDS = ("conv", "conv_same", "conv_static_same")
NORM_KINDS = ("bn", "bn_act", "frozen_bn")
KINDS = ("linear", *CONV_KINDS, *NORM_KINDS)
_BN_DIMS = {f"torch.nn.modules.batchnorm.BatchNorm{d}d": d for d in (1, 2, 3)}
_FROZEN = "torchvision.ops.misc.FrozenBatchNorm2d"
_FROZEN_KEYS = ("weight", "bias", "running_mean", "running_var")

# qualified class name -> kind; PatchNorm.adapters is this dict (register_adapter adds to it)
ADAPTERS: dict[str, str] = {
    LINEAR: "linear",
    **{f"torch.nn.modules.conv.Conv{d}d": "conv" for d in (1, 2, 3)},
    "timm.layers.conv2d_same.Conv2dSame": "conv_same",
    "efficientnet_pytorch.utils.Conv2dDynamicSamePadding": "conv_same",
    "efficientnet_pytorch.utils.Conv2dStaticSamePadding": "conv_static_same",
    "timm.layers.linear.Linear": "linear",  # F.linear outside TorchScript
    **{name: "bn" for name in _BN_DIMS},
    "torch.nn.modules.batchnorm.SyncBatchNorm": "bn",  # eval: F.batch_norm with its running statistics
    "timm.layers.norm_act.BatchNormAct2d": "bn_act",
    "timm.layers.norm_act.SyncBatchNormAct": "bn_act",  # timm's convert_sync_batchnorm of BatchNormAct2d
    _FROZEN: "frozen_bn",
}
# the base class a kind's classes must derive from (None: any nn.Module)
_FAMILY: dict[str, type | None] = {
    "linear": nn.Linear, **{k: nn.modules.conv._ConvNd for k in CONV_KINDS},
    "bn": nn.modules.batchnorm._BatchNorm, "bn_act": nn.modules.batchnorm._BatchNorm, "frozen_bn": None,
}
_HOW = "normswap.variants.patchnorm.register_adapter"
_TRANSPOSED = nn.modules.conv._ConvTransposeNd


def register_adapter(cls: type | str, kind: str) -> None:
    """Let PatchNorm read instances of ``cls`` (a class, or its qualified name ``"pkg.module.Class"``) as
    ``kind`` (one of :data:`KINDS`; see the module docstring for what each kind assumes of the class's
    forward). Register before planning, and again before ``normswap.load`` in a new process: a file stores the
    plan, not the adapters. Registering a class already known under another kind is an error."""
    if kind not in KINDS:
        raise OptionError(f"unknown PatchNorm adapter kind {kind!r}; use one of {', '.join(KINDS)}")
    if isinstance(cls, str):
        name = cls
    elif isinstance(cls, type):
        name = qualname(cls)
        family = _FAMILY[kind]
        if family is not None and not issubclass(cls, family) or issubclass(cls, _TRANSPOSED):
            what = family.__name__ if family is not None else "nn.Module"
            raise OptionError(f"a {kind} adapter needs a subclass of {what} (not a transposed convolution); "
                              f"{name} is not one")
    else:
        raise OptionError(f"register_adapter takes a class or its qualified name, got {type(cls).__name__}")
    if ADAPTERS.get(name, kind) != kind:
        raise OptionError(f"{name} already has the PatchNorm adapter {ADAPTERS[name]!r}, not {kind!r}")
    ADAPTERS[name] = kind


class NormActTail(nn.Module):
    """What stays of a folded norm + activation layer (timm ``BatchNormAct2d``): its ``drop`` then its ``act``
    (copies), in the source's order. State_dict keys: the source's ``drop.*`` and ``act.*`` (usually none)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.drop = copy.deepcopy(source.drop)
        self.act = copy.deepcopy(source.act)
        self.train(source.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def classify(found: tuple[str | None, str], module: nn.Module) -> tuple[str | None, str]:
    """``found`` (the adapter lookup of ``module``'s class), unless the instance does not fit its kind (a class
    registered by name outside the kind's family, say)."""
    kind = found[0]
    if kind is None:
        return found
    family = _FAMILY[kind]
    bad = (family is not None and not isinstance(module, family)) or isinstance(module, _TRANSPOSED) or (
        kind == "frozen_bn" and not all(torch.is_tensor(getattr(module, a, None)) for a in _FROZEN_KEYS))
    if bad:
        return None, f"{qualname(module)} is registered as a PatchNorm {kind} adapter but does not fit that kind"
    return found


def place_tail(model: nn.Module, site: Site, module: nn.Module) -> None:
    """Put the :class:`NormActTail` that ``module`` (a just-built site) holds where ``apply`` left the folded
    norm's ``nn.Identity``, under every name of that placeholder."""
    tail = module.__dict__.pop("_tail", None)
    if tail is None:
        return
    placeholder = model.get_submodule(site.absorbs[-1])
    for name, sub in list(model.named_modules(remove_duplicate=False)):
        if sub is placeholder and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, tail)


def norm_dims(module: nn.Module) -> int | None:
    """The conv dimensionality a norm pairs with (BatchNorm1d: 1, also Linear), None when its class says nothing."""
    for c in type(module).__mro__:
        name = qualname(c)
        if name in _BN_DIMS:
            return _BN_DIMS[name]
        if name == _FROZEN:
            return 2
    return None


def norm_channels(module: nn.Module) -> int:
    return int(getattr(module, "num_features", None) or module.running_mean.numel())


def norm_problem(module: nn.Module, kind: str) -> str:
    """Why a norm of ``kind`` holds nothing to fold ("" if it does)."""
    if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None or (
            kind != "frozen_bn" and not getattr(module, "track_running_stats", True)):
        return "BatchNorm without running statistics (track_running_stats=False): nothing fixed to fold"
    if kind == "bn_act" and not all(isinstance(getattr(module, a, None), nn.Module) for a in ("drop", "act")):
        return f"{qualname(module)} is registered as bn_act but has no 'drop' and 'act' modules"
    return ""


def check_site(classify: Any, site: Site, module: nn.Module, absorbed: list[nn.Module]
               ) -> tuple[str, str, nn.Module | None, str | None]:
    """``(shape, source kind, norm or None, norm kind or None)`` of a site about to be built (``shape``: linear
    or conv), or a NormswapError when the plan does not fit the modules (or an adapter is missing)."""
    kind = site.config.get("source_kind")
    src = classify(module)[0]
    for m in (module, *absorbed):
        if classify(m)[0] is None:
            raise NormswapError(f"site '{site.name}': no PatchNorm adapter for {qualname(m)}; register it with {_HOW} "
                                "before building or loading (docs/patchnorm.md)")
    shape = "linear" if src == "linear" else "conv" if src in CONV_KINDS else None
    if kind not in ("linear", "linear_bn", "conv", "conv_bn") or shape != kind.partition("_")[0]:
        raise NormswapError(f"site '{site.name}': the plan says source kind {kind!r} but the module is {qualname(module)}")
    if not kind.endswith("_bn"):
        if absorbed:
            raise NormswapError(f"site '{site.name}': a {kind} site absorbs no modules, got {len(absorbed)}")
        return shape, src, None, None
    dims = len(module.kernel_size) if shape == "conv" else 1
    norm_kind = classify(absorbed[0])[0] if len(absorbed) == 1 else None
    if norm_kind not in NORM_KINDS or norm_dims(absorbed[0]) not in (dims, None):
        got = ", ".join(qualname(m) for m in absorbed) or "nothing"
        raise NormswapError(f"site '{site.name}': a {kind} site absorbs one BatchNorm{dims}d, got {got}")
    problem = norm_problem(absorbed[0], norm_kind)
    if problem:
        raise NormswapError(f"site '{site.name}': cannot fold '{site.absorbs[0]}': {problem}")
    return shape, src, absorbed[0], norm_kind


def _hint(module: nn.Module, role: str) -> str:
    """How to register an adapter for the class of ``module`` (``role``: 'conv' or 'norm')."""
    name = qualname(module)
    if role == "conv":
        base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        kinds = ("'linear' if its forward is nn.Linear's" if isinstance(module, nn.Linear) else
                 f"'conv' if its forward is nn.{base.__name__}'s, 'conv_same' if it pads TF-'same' from the input "
                 "size first")
    else:
        kinds = "'bn' if its forward is its BatchNorm base's in eval mode, 'bn_act' if its drop and act follow"
    return f"register one with {_HOW}('{name}', KIND) before planning ({kinds}; docs/patchnorm.md)"


def _affine(module: nn.Module) -> bool:
    """A Linear or a (not transposed) convolution: what a BatchNorm can fold into."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(module, _TRANSPOSED)


def _unknown(module: nn.Module) -> str:
    base = next((c for c in type(module).__mro__[1:] if qualname(c) in ADAPTERS), type(module).__mro__[1])
    return f"unknown subclass {qualname(module)} of {base.__name__}: no PatchNorm adapter"


def pair_problem(info: Any, by_name: dict[str, Any], classify: Any) -> str:
    """Why the norm of ``info`` cannot be folded into its producer ("" if it can). ``classify`` is the variant's."""
    bn = info.module
    kind = classify(bn)[0]
    problem = norm_problem(bn, kind) if kind in NORM_KINDS else ""
    if problem:
        return problem
    if info.calls is not None and info.calls > 1:
        return f"BatchNorm is called {info.calls} times: folding it into one producer would change the other calls"
    dims = norm_dims(bn)
    what = " or ".join(([f"Conv{dims}d"] if dims else ["Conv"]) + (["Linear"] if dims in (1, None) else []))
    producer = by_name.get(info.producer) if info.producer is not None else None
    if producer is None:
        if info.path == "walk":
            return f"found by the module walk: no preceding {what} could be proven to feed it"
        return f"no preceding {what}: its input is not the output of a module"
    src = producer.module
    src_kind, _ = classify(src)
    if src_kind is None and _affine(src):
        return (f"its input comes from '{info.producer}', an {_unknown(src)}; if the pair should fold, "
                + _hint(src, "conv"))
    fits = (src_kind == "linear" and dims in (1, None)) or (
        src_kind in CONV_KINDS and dims in (None, len(src.kernel_size)))
    if not fits:
        return f"its input comes from '{info.producer}' ({type(src).__name__}), not a {what}"
    if info.producer_exclusive is None:
        return (f"found by the module walk and not provably exclusive: the output of '{info.producer}' "
                "may have other users")
    if not info.producer_exclusive:
        return f"the output of '{info.producer}' has other users (a residual, say): folding would change them"
    out = getattr(src, "out_channels", getattr(src, "out_features", None))
    if out != norm_channels(bn):
        return f"'{info.producer}' has {out} output channels, the BatchNorm {norm_channels(bn)}"
    return ""


def _pair_hint(info: Any, by_name: dict[str, Any], classify: Any) -> str:
    """For a BatchNorm-family module without an adapter that a Conv/Linear feeds: how to register it."""
    producer = by_name.get(info.producer) if info.producer is not None else None
    if producer is None or not _affine(producer.module):
        return ""
    return f"; the fx graph shows '{info.producer}' feeding it: if the pair should fold, " + _hint(info.module, "norm")


def propose(cls: Any, infos: list[Any], config: VariantConfig, ln_reason: str) -> list[Site]:
    """PatchNorm's sites: Conv/Linear -> norm pairs (the norm absorbed), skip sites for other norms (with how to
    register a missing adapter) and LayerNorms, opt-in sites for every other Linear/Conv of a known kind."""
    by_name = {i.name: i for i in infos}
    pairs: dict[str, Any] = {}  # producer name -> norm info
    norm_reasons: dict[str, str] = {}
    for info in infos:
        kind, reason = cls.classify(info.module)
        if kind in NORM_KINDS:
            problem = pair_problem(info, by_name, cls.classify)
            if problem:
                norm_reasons[info.name] = problem
            else:
                pairs[info.producer] = info
        elif reason and isinstance(info.module, nn.modules.batchnorm._BatchNorm):
            norm_reasons[info.name] = _unknown(info.module) + _pair_hint(info, by_name, cls.classify)
    # an unknown Conv/Linear subclass feeding a norm: say so on its own site too
    feeds = {i.producer: i.name for i in infos if i.producer is not None and (
        cls.classify(i.module)[0] in NORM_KINDS or isinstance(i.module, nn.modules.batchnorm._BatchNorm))}
    sites = []
    for info in infos:
        kind, reason = cls.classify(info.module)
        common = dict(source_type=qualname(info.module), variant=cls.name, path=info.path)
        if isinstance(info.module, nn.LayerNorm):
            sites.append(Site(name=info.name, action=SKIP, reason=ln_reason, pattern=info.pattern(),
                              facts=info.facts(), **common))
        elif info.name in norm_reasons:
            sites.append(Site(name=info.name, action=SKIP, reason=norm_reasons[info.name], pattern=info.pattern(),
                              facts=info.facts(), **common))
        elif kind is None:
            if reason and info.name in feeds and _affine(info.module):
                reason = (f"{_unknown(info.module)}; it feeds '{feeds[info.name]}': if the pair should fold, "
                          + _hint(info.module, "conv"))
            if reason:
                sites.append(Site(name=info.name, action=SKIP, reason=reason, pattern=info.pattern(),
                                  facts=info.facts(), **common))
        elif kind in NORM_KINDS:
            continue  # folded into its producer's site
        elif info.name in pairs:
            bn = pairs[info.name]
            norm_kind = cls.classify(bn.module)[0]
            shape = "linear" if kind == "linear" else "conv"
            what = (f"{type(bn.module).__name__} '{bn.name}' folded in (eval statistics); its drop and act stay "
                    "after the layer" if norm_kind == "bn_act" else
                    f"BatchNorm '{bn.name}' folded in (eval statistics) and replaced by nn.Identity")
            sites.append(Site(
                name=info.name, action=CONVERT, pattern=f"{shape}->bn", absorbs=[bn.name], reason=what,
                config={**config.to_dict(), "source_kind": f"{shape}_bn"},
                facts={**info.facts(), "bn": bn.name, "bn_facts": bn.facts(), "norm_kind": norm_kind}, **common,
            ))
        else:
            sites.append(Site(
                name=info.name, action=CONVERT, opt_in=True, pattern=info.pattern(),
                reason=f"plain {type(info.module).__name__} wrapped (no BatchNorm to fold)",
                config={**config.to_dict(), "source_kind": "linear" if kind == "linear" else "conv"},
                facts=info.facts(), **common,
            ))
    return sites


def plain_source(layer: nn.Module) -> nn.Module | None:
    """The plain module a PatchNorm layer at strength 0 computes, bit for bit (``Variant.source_function``): an
    ``nn.Linear`` or ``nn.Conv1d/2d/3d`` it was built from with no BatchNorm folded in, rebuilt around the layer's
    own weight and bias; its forward then makes that module's own call (``F.linear``; the conv with the same
    stride, padding, dilation, groups, padding mode). ``None`` for a folded pair (exact only to rounding), a
    same-padding conv and any other class (their forwards are their own)."""
    source = getattr(layer, "_source", None)
    if source is nn.Linear:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    elif source in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and layer.geom.pre_pads is None:
        plain = source(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.geom.padding,
                       layer.dilation, layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                       device="meta")
    else:
        return None
    return share_tensors(plain, layer, ("weight", "bias"))
