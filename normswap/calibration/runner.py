"""The calibration runner: fit every converted module's statistics on data, keeping the exact start.

Phases, each optional, in this order:

1. **BatchNorm re-estimation** (``reestimate_bn``): the BatchNorms left in the model (not converted) get
   their running statistics reset and re-estimated as a cumulative average over the calibration batches
   (``momentum=None``, only those modules in train mode). This changes the model on purpose, so it is off
   by default.
2. **Data pass** for variants that collect statistics of their own inputs (UAN's EM, ANAct's gains): one
   pass over the batches with every variant module at strength 0, so each sees the *original* network's
   activations; then ``calibration_end`` (EM runs there).
3. **Network order** for variants that fit against the original's activations (``needs_targets``, PatchNorm's
   gains, docs/methods.md section 1.3.3): layer by layer in execution order, each layer sees its input in the converted
   network (the layers before it already calibrated and at the calibration strength) and the *reference*
   network's output at the same point as target. A forward stops as soon as it has what it needs.
4. ``after_calibration`` hooks (ANAct refolds its compensation) and the per-site figures.

Every module is run in eval mode under ``no_grad``; on any error the hooks are aborted, the collected
statistics dropped, the variant layers' state (even of layers solved before the error), strengths, modes and
BatchNorm statistics restored and every hook removed. Under
torch.distributed the statistics are summed over the workers (:mod:`normswap.core.dist`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from normswap.core import dist
from normswap.errors import NormswapError
from normswap.core.plan import Plan, Site
from normswap.core.probe import ProbeInput
from normswap.surgery.local import clone_tensors
from normswap.variants import registry
from normswap.variants import CalibrationSettings, Variant, set_strengths, strengths_of

__all__ = ["CalibrationLog", "as_probe", "execution_order", "run_calibration"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class CalibrationLog:
    """What :func:`calibrate` did: batches and samples seen, time, per-site method and figures."""

    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    strength: float = 1.0
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    bn_reestimated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    """Raised from a hook once a forward pass has produced what the runner needs."""


def as_probe(batch: Any) -> ProbeInput:
    """A batch as forward arguments: a ProbeInput as is, a tensor, or ``(inputs, labels)`` (labels dropped)."""
    if isinstance(batch, ProbeInput):
        return batch
    if torch.is_tensor(batch):
        return ProbeInput((batch,))
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return ProbeInput((batch[0],))
    raise NormswapError(f"a calibration batch must be a tensor, (inputs, labels) or a ProbeInput; got {type(batch).__name__}")


def _size(batch: ProbeInput) -> int:
    for t in [*batch.args, *batch.kwargs.values()]:
        if torch.is_tensor(t) and t.dim():
            return int(t.shape[0])
        if isinstance(t, (list, tuple)):
            return len(t)
    return 1


def _run(model: nn.Module, batch: ProbeInput) -> Any:
    try:
        return model(*batch.args, **batch.kwargs)
    except _Stop:
        return None


def _capture(model: nn.Module, batch: ProbeInput, name: str, what: str) -> torch.Tensor | None:
    """The input (``what="input"``) or output of module ``name`` on its first call, stopping the forward there."""
    got: list[torch.Tensor] = []
    module = model.get_submodule(name)
    if what == "input":
        def pre(_m: nn.Module, args: tuple) -> None:
            got.append(args[0])
            raise _Stop
        handle = module.register_forward_pre_hook(pre)
    else:
        def post(_m: nn.Module, _args: tuple, out: Any) -> None:
            got.append(out)
            raise _Stop
        handle = module.register_forward_hook(post)
    try:
        _run(model, batch)
    finally:
        handle.remove()
    return got[0] if got else None


def _calibrated_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the state entries calibration may write: those ``module.calibrated_state()`` names, or the
    whole state_dict where the variant names none."""
    state = module.state_dict()
    keys = module.calibrated_state()
    keys = list(state) if keys is None else keys
    return {k: state[k].clone() for k in keys if k in state}


def execution_order(model: nn.Module, names: list[str], batch: ProbeInput) -> list[str]:
    """``names`` sorted by when each module is first called on ``batch`` (modules never called come last)."""
    seen: list[str] = []
    handles = []
    for name in names:
        def pre(_m: nn.Module, _a: tuple, name: str = name) -> None:
            if name not in seen:
                seen.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def _reestimate_bn(model: nn.Module, batches: list[ProbeInput], bar: Any) -> list[str]:
    names = [n for n, m in model.named_modules()
             if isinstance(m, _BN) and not isinstance(m, Variant) and m.track_running_stats]
    mods = [model.get_submodule(n) for n in names]
    momenta = [m.momentum for m in mods]
    try:
        for m in mods:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for batch in batches:
            _run(model, batch)
            bar.update(1)
    finally:
        for m, mom in zip(mods, momenta):
            m.momentum = mom
            m.eval()
    dist.average_buffers(mods)
    return names


def run_calibration(model: nn.Module, plan: Plan, batches: Iterable[Any], *, reference: nn.Module | None = None,
              settings: CalibrationSettings | None = None, only_required: bool = False,
              reestimate_bn: bool = False, layerwise: bool = False, progress: bool = False,
              site_inputs: Sequence[tuple[str, tuple, dict]] | None = None) -> CalibrationLog:
    """Calibrate ``model`` (converted by ``plan``) on ``batches`` (tensors, ``(x, y)`` pairs or ProbeInputs).

    Args:
        reference: the original network, the target of network-order fits (PatchNorm's gains). Default: a
            copy of ``model`` with every variant at strength 0, which computes the original function.
        settings: calibration strength (the ``lam`` PatchNorm's gains are fit for), seed, EM settings;
            distributed collectives are filled in when a torch.distributed group is initialised.
        only_required: calibrate only the variants an exact start needs (``Variant.needs_calibration``), as
            ``convert`` does on its probe batch.
        reestimate_bn: re-estimate the remaining BatchNorms' running statistics first.
        layerwise: network order strictly layer by layer (one pass over the data per layer, each forward stopped
            at the layer; exact but slow) instead of streaming (two forward passes per batch, each layer
            re-solved from all batches so far just before it runs).
        progress: show progress bars.
        site_inputs: ``(site, args, kwargs)`` of every call of the data-pass sites in a forward of the *original*
            network on ``batches``, in call order (``convert`` records them in its verification forward): the data
            pass feeds them to the site modules (copies: a module may write into its input) instead of running the
            model, which at strength 0 computes the original function, so the sites see the same values. Only
            for a data pass alone (no ``reestimate_bn``, no network-order site).

    The model's strengths and train/eval modes are the same afterwards; at strength 0 it still computes the
    original function (unless ``reestimate_bn`` changed its BatchNorms).
    """
    settings = settings or CalibrationSettings()
    if settings.reduce is None and dist.world().active:
        settings.reduce, settings.broadcast = dist.collectives()
    data = [as_probe(b) for b in batches]
    log = CalibrationLog(strength=settings.strength)
    sites: list[tuple[Any, Site, Variant]] = []
    for site in plan.converted:
        cls = registry.get(site.variant)
        module = model.get_submodule(site.name)
        if isinstance(module, Variant) and (cls.needs_calibration or not only_required):
            sites.append((cls, site, module))
    if not sites and not reestimate_bn:
        return log
    if not data:
        raise NormswapError("calibration needs at least one batch of data")
    start = time.perf_counter()
    collect = [(c, s, m) for c, s, m in sites if not c.needs_targets]
    ordered = [(c, s, m) for c, s, m in sites if c.needs_targets]
    if site_inputs is not None and (ordered or reestimate_bn):
        raise NormswapError("recorded site inputs stand for a data pass only: not with BatchNorm re-estimation or "
                            "a network-order variant")
    modes = {m: m.training for m in model.modules()}
    saved_strengths = strengths_of(model)
    bn_state = {k: v.clone() for k, v in model.state_dict().items()} if reestimate_bn else None
    # an error midway must not leave the layers solved before it calibrated: their state comes back too (only
    # what calibration writes, where the variant names it: PatchNorm's gains, not its conv weights)
    variant_states = [(m, _calibrated_state(m)) for _, _, m in sites]
    begun: list[Variant] = []
    total = len(data) * (int(reestimate_bn) + int(bool(collect)) + len(ordered))
    bar = tqdm(total=total, desc="calibrating", unit="batch", disable=not progress, leave=False)
    try:
        model.eval()
        with torch.no_grad():
            if reestimate_bn:
                bar.set_postfix_str("BatchNorm statistics")
                log.bn_reestimated = _reestimate_bn(model, data, bar)
            if collect:
                bar.set_postfix_str("data pass")
                set_strengths(model, 0.0)
                for _, _, module in collect:
                    module.calibration_begin(settings)
                    begun.append(module)
                if site_inputs is None:
                    for batch in data:
                        _run(model, batch)
                        bar.update(1)
                else:
                    _feed(model, collect, site_inputs)
                    bar.update(len(data))
                by_class: dict[type, list[Variant]] = {}
                for cls, site, module in collect:  # one call per variant: UAN fits all its layers' EM at once
                    begun.remove(module)
                    by_class.setdefault(cls, []).append(module)
                    log.sites[site.name] = {"variant": site.variant, "method": "data pass (original activations)"}
                for cls, modules in by_class.items():
                    cls.calibration_end_many(modules)
                set_strengths(model, saved_strengths)
            if ordered:
                _network_order(model, ordered, data, reference, settings, log, begun, bar, layerwise)
    except BaseException:
        for module in begun:
            module.calibration_abort()
        for module, state in variant_states:
            module.load_state_dict(state, strict=False)
        if bn_state is not None:
            model.load_state_dict(bn_state)
        raise
    finally:
        bar.close()
        set_strengths(model, saved_strengths)
        for m, mode in modes.items():
            m.training = mode
    for cls, site, module in sites:
        cls.after_calibration(model, site, module)
        info = log.sites.setdefault(site.name, {"variant": site.variant})
        info.update(module.calibration_info())
    log.batches, log.samples = dist.total(len(data), sum(_size(b) for b in data))  # over all ranks
    log.seconds = time.perf_counter() - start
    return log


def _feed(model: nn.Module, collect: list[tuple[Any, Site, Variant]], calls: Sequence[tuple[str, tuple, dict]]
          ) -> None:
    """The data pass from recorded calls: each data-pass site module run on copies of its recorded inputs (it may
    write into them; the recording serves verification after), in the recorded order. A site with no recorded call
    was not reached, and sees nothing, as in a data pass."""
    modules = {site.name: module for _, site, module in collect}
    for name, args, kwargs in calls:
        module = modules.get(name)
        if module is not None:
            module(*clone_tensors(args), **clone_tensors(kwargs))


def _network_order(model: nn.Module, ordered: list[tuple[Any, Site, Variant]], data: list[ProbeInput],
                   reference: nn.Module | None, settings: CalibrationSettings, log: CalibrationLog,
                   begun: list[Variant], bar: Any, layerwise: bool) -> None:
    """Fit each ``needs_targets`` site against the reference's activations in execution order (module doc)."""
    if reference is None:
        reference = copy.deepcopy(model)
        set_strengths(reference, 0.0)
        source = "this model at strength 0"
    else:
        source = "the original model"
    ref_modes = {m: m.training for m in reference.modules()}
    by_name = {s.name: (c, s, m) for c, s, m in ordered}
    targets = {name: c.compare_points(s)[0][0] for name, (c, s, _) in by_name.items()}
    how = "layer by layer" if layerwise else "streaming"
    try:
        reference.eval()
        if layerwise:
            names = execution_order(model, list(by_name), data[0])
            for name in names:
                module = by_name[name][2]
                bar.set_postfix_str(f"network order: {name}")
                module.calibration_begin(settings)
                begun.append(module)
                for batch in data:
                    y = _capture(reference, batch, targets[name], "output")
                    x = _capture(model, batch, name, "input")
                    if x is not None and y is not None:
                        module.observe(x, y)
                    bar.update(1)
                begun.remove(module)
                module.calibration_end()
                module.set_strength(settings.strength)  # the layers after it see it calibrated
        else:  # the execution order is recorded by the first pass (no forward of its own)
            names = _streaming(model, reference, {n: m for n, (_, _, m) in by_name.items()}, targets, data, settings,
                               begun, bar)
        for name in names:
            log.sites[name] = {"variant": by_name[name][1].variant,
                               "method": f"network order ({how}) against {source}, output of '{targets[name]}'"}
    finally:
        for m, mode in ref_modes.items():
            m.training = mode


def _streaming(model: nn.Module, reference: nn.Module, by_name: dict[str, Any], targets: dict[str, str],
               data: list[ProbeInput], settings: CalibrationSettings, begun: list[Variant], bar: Any) -> list[str]:
    """Network order in two forward passes per batch: the reference's outputs at every target are recorded,
    then the converted model runs with every layer at the calibration strength; just before a layer runs it
    adds the batch (its input, the reference's output) to its sums and re-solves its gains, so the layers after
    it see it calibrated on all data so far. The last batch leaves each layer fitted on every batch. Returns
    the names in the order the modules first ran (those that never ran last)."""
    store: dict[str, Any] = {}
    seen: list[str] = []
    modules, names = list(by_name.values()), list(by_name)

    def keep(name: str, out: Any) -> None:  # returns None: a forward hook's return value replaces the output
        if name not in store:
            store[name] = out.clone()  # an in-place activation may follow the module

    handles = []
    for name in set(targets.values()):
        handles.append(reference.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: keep(name, out)))
    for module, name in zip(modules, names):
        def pre(mod: Any, args: tuple, name: str = name) -> None:
            if name not in seen:
                seen.append(name)
            y = store.pop(targets[name], None)
            if y is not None and mod.collecting():
                mod.observe(args[0], y)
                mod.calibration_update()
        handles.append(module.register_forward_pre_hook(pre))
    try:
        for module in modules:
            module.calibration_begin(settings)
            module.set_strength(settings.strength)
            begun.append(module)
        bar.set_postfix_str("network order (streaming)")
        for batch in data:
            store.clear()
            _run(reference, batch)
            _run(model, batch)
            bar.update(len(modules))
        for module in modules:
            begun.remove(module)
            module.calibration_end()
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]
