"""The diagnostic run: hooks on every layer of interest, one or more batches, streaming reducers.

Layers (*sites*), in execution order: **affine** (Linear, ConvNd, PatchNorm layers), **norm** (BatchNorm,
LayerNorm, GroupNorm, ..., UAN, recenter, rescale) and **activation** modules (ReLU, GELU, ..., ANAct). A module
called several times in one forward (torchvision ResNet's shared ``relu``) gives one site per call:
``layer1.0.relu``, ``layer1.0.relu#2``. Per site (:mod:`normswap.diagnostics.measures` computes each):

- affine: the divergence factor of its input, and the effective factor a PatchNorm layer leaves;
- every site: the variance of its output (forward) and of the loss gradient at its output (backward);
- activation: ``rho``, ``rho'`` and ``lam`` of its input (supported kinds; ANAct sites excluded);
- the geometry sites (the activation sites, or the affine ones in a model without activation modules):
  the batch geometry of the post-activation features;
- UAN sites: the mixture against its inputs.

The run sets the model to eval mode (with ``batch_stats``, BatchNorm-like layers use batch statistics: their
running statistics are put back afterwards), optionally every variant module to one strength, and takes
gradients with ``torch.autograd.grad`` with respect to the input only, so no parameter's ``.grad`` changes.
Hooks are removed and modes, strengths and running statistics restored in a ``finally``, whatever fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from normswap.variants.strength import set_strengths, strengths_of
from normswap.diagnostics.measures import GainStats, GeometryStats, MixtureStats, Moments, divergence_factor, \
    effective_factor, uan_summary
from normswap.errors import NormswapError
from normswap.core.kinds import is_activation, is_norm
from normswap.surgery.verify import output_tensors
from normswap.variants.anact.activations import activation_kind
from normswap.variants.base import Variant

__all__ = ["ModelDiagnosis", "SiteDiagnosis", "run_model"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd


@dataclass
class SiteDiagnosis:
    """One site's results: ``measures`` maps a measure family (``divergence``, ``effective``, ``forward_var``,
    ``grad_var``, ``gains``, ``geometry``, ``uan``) to its figures."""

    name: str
    module: str
    kind: str
    type: str
    index: int
    measures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module, "kind": self.kind, "type": self.type, "index": self.index,
                **self.measures}


@dataclass
class ModelDiagnosis:
    """Every site of one model (in execution order), with what the run was."""

    label: str
    sites: list[SiteDiagnosis]
    batches: int
    samples: int
    batch_stats: bool
    at_init: bool = False
    cosine: dict[str, list[list[float]]] = field(default_factory=dict)  # last batch, last geometry site

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "batches": self.batches, "samples": self.samples, "batch_stats": self.batch_stats,
                "at_init": self.at_init, "cosine": self.cosine, "sites": [s.to_dict() for s in self.sites]}


def _site_kind(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Linear, _CONV)) or (isinstance(m, Variant) and type(m).name == "patchnorm"):
        return "affine"
    if is_activation(m) or (isinstance(m, Variant) and type(m).name == "anact"):
        return "activation"
    if is_norm(m) or isinstance(m, Variant):
        return "norm"
    return None


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, _BN) or (isinstance(m, Variant) and hasattr(m, "running_mean") and hasattr(m, "_batch_stats"))


class _Collector:
    """The hooks of one run and the reducers they feed."""

    def __init__(self, model: nn.Module, geometry_only: bool) -> None:
        self.geometry_only = geometry_only
        self.modules = [(n, m, k) for n, m in model.named_modules() for k in [_site_kind(m)] if k and n]
        kinds = {k for _, _, k in self.modules}
        self.geometry_kind = "activation" if "activation" in kinds else "affine"
        self.entries: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, int] = {}
        self.handles: list[Any] = []
        self.grad_hooks = not geometry_only

    def attach(self, model: nn.Module) -> None:
        self.handles.append(model.register_forward_pre_hook(lambda *_: self.calls.clear()))
        for name, m, kind in self.modules:
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, n=name, k=kind: self._pre(n, k, mod, args)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, n=name: self._post(n, mod, out)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _entry(self, name: str, kind: str, m: nn.Module) -> dict[str, Any]:
        count = self.calls.get(name, 0) + 1
        self.calls[name] = count
        key = name if count == 1 else f"{name}#{count}"
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = {"module": name, "kind": kind, "type": type(m).__name__, "acc": {}}
            acc = e["acc"]
            if kind == self.geometry_kind:
                acc["geometry"] = GeometryStats()
            if not self.geometry_only:
                acc["forward_var"], acc["grad_var"] = Moments(), Moments()
                if kind == "affine":
                    acc["divergence"], acc["effective"] = Moments(), Moments()
                found = activation_kind(m) if kind == "activation" else None
                if found is not None:
                    acc["gains"] = GainStats(*found)
                if type(m).__name__.startswith("UAN"):
                    acc["uan"] = MixtureStats()
        return e

    def _pre(self, name: str, kind: str, m: nn.Module, args: tuple) -> None:
        e = self._entry(name, kind, m)
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if x is None or self.geometry_only:
            return
        acc = e["acc"]
        with torch.no_grad():
            if "divergence" in acc:
                acc["divergence"].update(divergence_factor(m, x))
                acc["effective"].update(effective_factor(m, x))
            if "gains" in acc:
                acc["gains"].update(x)
            if "uan" in acc:
                acc["uan"].update(*_uan_values(m, x))

    def _post(self, name: str, m: nn.Module, out: Any) -> None:
        count = self.calls.get(name, 1)
        key = name if count == 1 else f"{name}#{count}"
        acc = self.entries[key]["acc"]
        if not torch.is_tensor(out) or not out.is_floating_point():
            return
        with torch.no_grad():
            if "geometry" in acc:
                acc["geometry"].update(out)
            if "forward_var" in acc:
                acc["forward_var"].update(out)
        if "grad_var" in acc and out.requires_grad:
            out.register_hook(lambda g, mom=acc["grad_var"]: mom.update(g))

    def results(self, modules: dict[str, nn.Module]) -> tuple[list[SiteDiagnosis], dict[str, list[list[float]]]]:
        sites, cosine = [], {}
        for i, (key, e) in enumerate(self.entries.items()):
            measures: dict[str, Any] = {}
            for what, acc in e["acc"].items():
                if what == "uan":
                    measures[what] = uan_summary(modules[e["module"]], acc)
                elif what == "geometry":
                    measures[what] = acc.to_dict()
                    if acc.cosine is not None:
                        cosine = {key: acc.cosine.tolist()}
                else:
                    measures[what] = acc.to_dict()
            sites.append(SiteDiagnosis(key, e["module"], e["kind"], e["type"], i, measures))
        return sites, cosine


def _uan_values(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A UAN site's input as (C, n) rows on its mixture's scale, and the mixture's (K, C) parameters."""
    mu, var, log_pi = m._params(torch.float64)
    if mu.dim() == 2:  # channel mode
        v = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        return v, mu, var, log_pi
    if getattr(m, "kind", "") == "ln2d":
        x = x.permute(0, 2, 3, 1)
    d = len(m.normalized_shape)
    dims = tuple(range(-d, 0))
    xf = x.detach().double()
    xc = xf - xf.mean(dim=dims, keepdim=True)
    z = xc * torch.rsqrt(xc.square().mean(dim=dims, keepdim=True) + m.eps)
    return z.reshape(1, -1), mu[:, None], var[:, None], log_pi[:, None]


def default_loss(out: torch.Tensor, target: Any) -> torch.Tensor:
    """Cross-entropy against integer targets for (N, classes) outputs, else half the output's mean square."""
    if out.dim() == 2 and target is not None:
        return F.cross_entropy(out.float(), target)
    return 0.5 * out.float().square().mean()


def run_model(model: nn.Module, inputs: Iterable[torch.Tensor], *, label: str,
              target: Callable[[int, torch.Tensor], Any] | None = None, batch_stats: bool = False,
              strength: float | None = None, geometry_only: bool = False,
              loss: Callable[[torch.Tensor, Any], torch.Tensor] = default_loss,
              step: Callable[[], None] | None = None) -> ModelDiagnosis:
    """Diagnose ``model`` on batches of ``inputs``.

    ``target(i, output)`` gives the loss target of batch ``i`` (class indices, or None) from the model's
    detached output (labels, or the first model's predictions); ``step()`` is called after each batch (a
    progress bar). See the module docstring for what is measured."""
    modes = {m: m.training for m in model.modules()}
    strengths = strengths_of(model)
    norms = [m for m in model.modules() if _is_batch_norm(m)] if batch_stats else []
    saved = [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    collector = _Collector(model, geometry_only)
    n_batches = n_samples = 0
    try:
        model.eval()
        for m in norms:
            m.train()
        if strength is not None:
            set_strengths(model, strength)
        collector.attach(model)
        for i, x in enumerate(inputs):
            grad = not geometry_only and x.is_floating_point()
            with torch.enable_grad() if grad else torch.no_grad():
                inp = x.detach().requires_grad_(True) if grad else x
                outs = output_tensors(model(inp))
                if not outs:
                    raise NormswapError(f"{label}: the model returned no tensor to diagnose")
                out = outs[0]
                if grad:
                    goal = target(i, out.detach()) if target is not None else None
                    torch.autograd.grad(loss(out, goal), [inp], allow_unused=True)
            n_batches, n_samples = n_batches + 1, n_samples + int(x.shape[0])
            if step is not None:
                step()
    finally:
        collector.detach()
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)
        set_strengths(model, strengths)
        for m, mode in modes.items():
            m.training = mode
    sites, cosine = collector.results(dict(model.named_modules()))
    return ModelDiagnosis(label, sites, n_batches, n_samples, batch_stats, cosine=cosine)
