"""ANAct compensation: fold an activation's ``c * (f - mu)`` into the Linear / conv layers that consume it.

docs/methods.md section 2.2: ``W' = W / c``, ``b' = b + W mu`` (a conv sums W over its taps). Exact for Linear,
unpadded (or non-zero-padded) convolutions and chains through ops that commute with a positive affine map;
approximate for zero-padded convolutions; absent otherwise. A site is folded where that is exact (or
approximate, with ``allow_inexact``); every other site converts unfolded and is exact at strength 0 only
(:func:`decide`, :func:`exact_at`). Split from ``anact.py`` to keep files small.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.core.graph import reached_modules
from normswap.core.plan import CONVERT, SKIP
from normswap.variants.anact.activations import activation_kind, describe, unsupported_message

_RANK = {"exact": 0, "approximate": 1, "absent": 2}


def _compensation(info: Any, facts: dict[str, Any], by_name: dict[str, Any], per_channel: bool) -> dict | None:
    """``{"status", "reason", "consumers"}`` from the finder's ``downstream`` facts (None without them):
    the worst :func:`compensation_status` over every final user of the activation's output."""
    calls, down = getattr(info, "calls", None), facts.get("downstream")
    if isinstance(calls, int) and calls > 1:
        return {"status": "absent", "reason": f"the activation is called {calls} times", "consumers": []}
    if calls == 0 and facts.get("inside") and not isinstance(down, list):
        return {"status": "absent", "reason": f"it runs inside {facts['inside']}, a leaf of the graph that hides "
                "its consumers", "consumers": []}
    if not isinstance(down, list):
        return None
    results = [("absent", "the output has no user")] if not down else []
    for d in down:
        cinfo = by_name.get(d.get("consumer")) if d.get("module") else None
        if cinfo is None:
            results.append(("absent", f"its output feeds {d.get('consumer')}, not a Linear or convolution"))
        elif cinfo.calls not in (None, 1):
            results.append(("absent", f"consumer {cinfo.name} is called {cinfo.calls} times"))
        else:
            status, why = compensation_status(cinfo.module, list(d.get("via", [])), per_channel)
            results.append((status, f"{cinfo.name}: {why}" if why else ""))
    status = max((r[0] for r in results), key=_RANK.__getitem__)
    reason = "; ".join(dict.fromkeys(r[1] for r in results if r[0] == status and r[1]))
    return {"status": status, "reason": reason, "consumers": [d.get("consumer") for d in down]}


def folds(site: Any) -> bool:
    """Whether a site's ``c`` and ``mu`` are folded into its consumers: its compensation is exact, or
    approximate and ``allow_inexact`` is set (read from the site's facts and config, so old plans agree)."""
    comp = site.facts.get("compensation") or {}
    status = comp.get("status")
    return bool(comp.get("consumers")) and (
        status == "exact" or (status == "approximate" and bool(site.config.get("allow_inexact"))))


def exact_at(site: Any) -> str:
    """Where a converted site reproduces the original: ``"every strength"`` (folded, exact compensation),
    ``"strength 0"`` (unfolded: the blend is ``f`` itself at 0) or ``"no strength"`` (folded approximately)."""
    if not folds(site):
        return "strength 0"
    return "every strength" if (site.facts.get("compensation") or {}).get("status") == "exact" else "no strength"


_UNFOLDED = "not folded, so exact at strength 0 only"


def decide(kind: str, params: dict[str, Any], info: Any, facts: dict[str, Any], by_name: dict[str, Any],
           config: Any) -> tuple[str, str, dict[str, Any]]:
    """``(action, reason, site config)`` of a supported activation site (a module or a functional call).

    ``facts["compensation"]`` is set from the finder's facts (left out when there are none). Every site
    converts: an exact one is folded into its consumers (exact at every strength); an approximate one is
    folded too with ``config.allow_inexact``; any other is left unfolded, exact at strength 0 (the reason
    names the consumer that prevents folding). ``facts["exact_at"]`` says which (:func:`exact_at`)."""
    action, reason = CONVERT, ""
    comp = facts.setdefault("compensation", _compensation(info, facts, by_name, config.per_channel))
    if comp is None:
        del facts["compensation"]
        reason = f"no consumer facts: compensation not established; {_UNFOLDED}"
    elif comp.get("status") != "exact":
        why = f"compensation is {comp.get('status')}: {comp.get('reason', '')}".rstrip(": ")
        if comp.get("status") == "approximate" and config.allow_inexact:
            reason = f"{why}; folded approximately (allow_inexact)"
        elif comp.get("status") == "approximate":
            reason = f"{why}; {_UNFOLDED} (allow_inexact=true folds it approximately)"
        else:
            reason = f"{why}; {_UNFOLDED}"
    channels = _channel_count(info, by_name) if config.per_channel else None
    if config.per_channel and channels is None:
        action, reason = SKIP, "per_channel needs the channel count (dim 1), which the finder could not establish"
    if getattr(info, "path", None) == "fx" and getattr(info, "calls", None) == 0 and not facts.get("inside"):
        facts.pop("compensation", None)
        action, reason = SKIP, "forward never calls it: nothing to convert"
    extra = {**config.to_dict(), "source_kind": kind, **params, "channels": channels}
    if action == CONVERT:
        facts["exact_at"] = exact_at(SimpleNamespace(facts=facts, config=extra))
    return action, reason, extra


def decide_call(call: Any, name: str, facts: dict[str, Any], by_name: dict[str, Any],
                config: Any) -> tuple[str, str, dict[str, Any]]:
    """:func:`decide` for a functional activation call that would become module ``name`` (``ANAct.propose_functional``),
    after the checks only a call needs: constant parameters, a free name, no in-place write on a shared tensor."""
    found = activation_kind(call.target, call.args, call.kwargs)
    what = f"functional {call.function} call (node {call.node})"
    if found is None and activation_kind(call.target) is not None:
        return SKIP, f"{what}: its parameters are not constants, so no module can replace it", {}
    if found is None:
        return SKIP, unsupported_message(call.function), {}
    if name in by_name:
        return SKIP, f"{what}: the model already has a module named '{name}'", {}
    if call.inplace and not (call.input_users == 1 and call.input_fresh):
        return SKIP, (f"{what} works in place on a tensor that other code may still read: replacing it by an "
                      "out-of-place module could change the model"), {}
    action, reason, extra = decide(found[0], found[1], call, facts, by_name, config)
    if action == CONVERT and not reason:
        reason = f"{what} becomes module {name}: the converted model is a torch.fx.GraphModule"
    return action, reason, extra


def mark_unchecked(sites: list[Any], graph: Any) -> None:
    """Mark converted sites that would be exact where they are but whose input (an unfolded site) or
    consumers' input (a folded one) is changed by an inexact converted site upstream: one folded
    approximately, or an unfolded one at strength > 0. The probe compares with the original network, so
    they get ``facts["probe_check"] = False`` (see ``ANAct.finalize_plan``); without an fx graph every
    such site is marked once any site is inexact."""
    converted = [s for s in sites if s.action == CONVERT]
    inexact = {id(s): s for s in converted if exact_at(s) == "no strength"
               or (exact_at(s) == "strength 0" and float(s.config.get("strength", 0.0)) > 0)}
    if not inexact:
        return
    fx_graph = getattr(graph, "graph", None)
    reached = None
    if fx_graph is not None:
        bad = list(inexact.values())
        modules = {s.facts.get("inside") or s.name for s in bad if not s.facts.get("graph_rewrite")}
        reached = reached_modules(fx_graph, modules, {s.facts["node"] for s in bad if s.facts.get("node")})
    for site in converted:
        if id(site) in inexact:
            continue
        consumers = (site.facts.get("compensation") or {}).get("consumers", []) if folds(site) else [
            site.facts.get("inside") or site.name]
        if reached is None or reached.intersection(consumers):
            site.facts["probe_check"] = False
            note = "exact where it is, but not compared on the probe: an inexact site upstream changes its input"
            site.reason = f"{site.reason}; {note}" if site.reason else note


def _channel_count(info: Any, by_name: dict[str, Any]) -> int | None:
    """Channels of an activation's input: a fact, else its producer's out_channels/out_features/num_features."""
    producer = by_name.get(getattr(info, "producer", None) or "")
    mod = producer.module if producer is not None else None
    attrs = ("out_channels", "out_features", "num_features")
    found = [info.facts().get("channels")] + [getattr(mod, a, None) for a in attrs]
    return next((n for n in found if isinstance(n, int) and not isinstance(n, bool)), None)


# ---- compensation: folding c and mu into the consumers ---------------------------------------------------
# Ops between the activation and its consumer, normalised (lower case, no "_", no 1d/2d/3d suffix, no
# "." or "()"): these commute with g = c (f - mu) for c > 0 in eval mode (dropout is the identity then).
_TRANSPARENT_CHANNEL = {
    "identity", "contiguous", "clone", "flatten", "dropout", "alphadropout", "featurealphadropout", "adaptiveavgpool",
    "maxpool", "adaptivemaxpool", "interpolate", "upsample", "upsamplingnearest", "upsamplingbilinear"}
_TRANSPARENT = _TRANSPARENT_CHANNEL | {
    "reshape", "view", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "mean", "pixelshuffle",
    "pixelunshuffle", "channelshuffle", "getitem"}


def _norm_op(op: str) -> str:
    s = op.strip().rsplit(".", 1)[-1].removesuffix("()").lower().replace("_", "")
    return s[:-2] if s[-2:] in ("1d", "2d", "3d") else s


def _padding_is_zero(conv: nn.modules.conv._ConvNd) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "valid" or all(
            d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return all(p == 0 for p in conv.padding)


def compensation_status(consumer: nn.Module | None, path_ops: list[str], per_channel: bool = False) -> tuple[str, str]:
    """``("exact" | "approximate" | "absent", reason)`` for folding an ANAct into ``consumer``.

    ``path_ops`` names the ops between the activation and the consumer (function, method or torch.nn class
    names: ``"flatten"``, ``".view()"``, ``"Dropout"``, ``"adaptive_avg_pool2d"``; an average pool, which may
    zero-pad, is not among them). The caller must also establish that the activation has no other user and
    the consumer no other input (a residual add or a concatenation: absent)."""
    allowed = _TRANSPARENT_CHANNEL if per_channel else _TRANSPARENT
    for op in path_ops:
        if _norm_op(op) not in allowed:
            return "absent", f"'{op}' between the activation and its consumer does not commute with c * (f - mu)"
    if not isinstance(consumer, (nn.Linear, nn.modules.conv._ConvNd)):
        what = describe(consumer) if consumer is not None else "no module"
        return "absent", f"the consumer is {what}, not a Linear or convolution"
    if isinstance(consumer, nn.modules.conv._ConvNd):
        if consumer.transposed:
            return "absent", "a transposed convolution sums a varying number of taps per output: mu cannot be folded"
        if not _padding_is_zero(consumer) and consumer.padding_mode == "zeros":
            return "approximate", "zero padding: the pad value 0 in the new domain is mu in the old one"
    return "exact", ""


def _per_input(v: torch.Tensor, consumer: nn.Module, what: str) -> torch.Tensor:
    """A scalar or per-channel ``v`` laid out like the consumer's weight: (out, in_per_group, 1)."""
    w = consumer.weight
    groups = getattr(consumer, "groups", 1)
    out, ipg = w.shape[0], w.shape[1]
    n_in = ipg * groups
    v = v.reshape(-1)
    if v.numel() == 1:
        v = v.expand(n_in)
    elif v.numel() != n_in:
        if n_in % v.numel():
            raise NormswapError(f"cannot fold {v.numel()} per-channel {what} values into {n_in} input features")
        v = v.repeat_interleave(n_in // v.numel())  # (N, C, ...) flattened channel-major
    return v.view(groups, 1, ipg).expand(groups, out // groups, ipg).reshape(out, ipg, 1)


@torch.no_grad()
def fold_into_consumer(consumer: nn.Module, c: torch.Tensor | float, mu: torch.Tensor | float,
                       inverse: bool = False) -> None:
    """Rewrite ``consumer`` (Linear or non-transposed ConvNd) in place so ``consumer(c * (f - mu)) ==
    consumer_before(f)``: ``W' = W / c`` per input channel, ``b' = b + W mu`` (a conv sums W over its taps);
    exact at every output only where :func:`compensation_status` says so. ``inverse=True`` undoes such a
    fold (``W = W' c``, ``b = b' - W mu``): refold after calibration = undo with the old ``(c, mu)``, fold
    with the new. float64 arithmetic. A consumer without bias always gets one (zeros when ``mu = 0``), so
    its state_dict gains a ``bias`` key whatever the statistics are."""
    if not isinstance(consumer, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(consumer, "transposed", False):
        raise NormswapError(
            f"cannot fold ANAct into {describe(consumer)}: only Linear and (non-transposed) convolutions")
    w = consumer.weight
    c64 = torch.as_tensor(c, dtype=torch.float64, device=w.device).detach()
    mu64 = torch.as_tensor(mu, dtype=torch.float64, device=w.device).detach()
    if not bool(torch.isfinite(c64).all() & (c64 > 0).all()) or not bool(torch.isfinite(mu64).all()):
        raise NormswapError("cannot fold ANAct: its scale must be positive and finite and its mean finite")
    cf, muf = _per_input(c64, consumer, "scale"), _per_input(mu64, consumer, "mean")
    w64 = w.detach().to(torch.float64).reshape(w.shape[0], w.shape[1], -1)
    new_w = w64 * cf if inverse else w64 / cf
    shift = ((new_w if inverse else w64) * muf).sum(dim=(1, 2))
    if consumer.bias is None:
        consumer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                     requires_grad=w.requires_grad)
    b64 = consumer.bias.detach().to(torch.float64)
    w.copy_(new_w.reshape(w.shape).to(w.dtype))
    consumer.bias.copy_((b64 - shift if inverse else b64 + shift).to(consumer.bias.dtype))


def export_fold(model: nn.Module, consumers: dict[str, list[str]], inplace: bool = False) -> nn.Module:
    """Inference export: fold each named ANAct's frozen map of ``f`` (``ANAct.affine()``: ``c``, ``mu`` at a
    folded site) into its consumers (an inverse :func:`fold_into_consumer`) and put its plain ``act`` back
    under every name it has; the result computes what ``model`` computes (in a compensated model, the
    consumers become the original ones again). ``consumers``: ANAct module name -> names of *every* module
    consuming its output, each exactly foldable; an empty list is allowed only where the ANAct computes
    ``f`` itself (an unfolded site at strength 0). Works on a deep copy unless ``inplace``; everything is
    checked before the first change."""
    target, aliases = model if inplace else copy.deepcopy(model), {}
    for name, mod in target.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(name)
    jobs, seen = [], set()
    for name, names in consumers.items():
        act = target.get_submodule(name)
        if type(act).__name__ != "ANAct" or not hasattr(act, "affine"):
            raise NormswapError(f"export_fold: '{name}' is {describe(act)}, not an ANAct")
        with torch.no_grad():
            c, mu = (t.detach() for t in act.affine())
        if not names and not (bool((c == 1).all()) and bool((mu == 0).all())):
            raise NormswapError(f"export_fold: '{name}' has no consumer to fold into and does not compute its plain "
                                f"activation (strength {act.current_strength():g})")
        mods = []
        for cname in dict.fromkeys(names):
            mod = target.get_submodule(cname)
            status, reason = compensation_status(mod, [], act.per_channel)
            if status != "exact" or id(mod) in seen:
                why = reason or "it consumes more than one ANAct"
                raise NormswapError(f"export_fold: cannot fold '{name}' into '{cname}' exactly ({why})")
            seen.add(id(mod))
            mods.append(mod)
        jobs.append((act, mods, c, mu))
    for act, mods, c, mu in jobs:
        for mod in mods:
            fold_into_consumer(mod, c, mu, inverse=True)
        for alias in aliases[id(act)]:
            parent, _, child = alias.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, child, act.act)
    return target
