"""The activations ANAct supports: their forward, their exact derivative, and how to recognise them.

Each activation *kind* is a string (``"relu"``, ``"gelu_tanh"``, ...) plus a small JSON-able params
dict (``{"negative_slope": 0.01}``), so torch.nn modules and functional calls map to the same kinds.
:func:`derivative` is the gradient torch's autograd computes, from torch's own backward kernels (one
vectorised pass; the closed forms took 4-20 times longer), including torch's subgradients at kinks (ReLU, ReLU6, Hardsigmoid: 0 at every kink; LeakyReLU and the
ELU family: the left branch at 0; Hardswish: 0 at -3 and 1 at +3) and Softplus' linear branch for
``beta * x > threshold``. tests/test_anact.py checks every kind against autograd on a grid with kinks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError

__all__ = [
    "KINDS", "UnsupportedActivationError", "activation_kind", "apply_activation", "derivative",
    "make_activation", "resolve_activation", "sum_over_ranks",
]

KINDS = (
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "gelu_tanh", "silu", "mish", "tanh",
    "sigmoid", "softplus", "hardswish", "hardsigmoid",
)
DEFAULTS: dict[str, dict[str, float]] = {
    "leaky_relu": {"negative_slope": 0.01}, "elu": {"alpha": 1.0}, "celu": {"alpha": 1.0},
    "softplus": {"beta": 1.0, "threshold": 20.0},
}
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


class UnsupportedActivationError(NormswapError):
    """An activation that ANAct has no exact derivative for."""


_A = torch.ops.aten


def _one(x: torch.Tensor) -> torch.Tensor:
    """The incoming gradient 1 at every value (a broadcast scalar: no full-size tensor)."""
    return torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)


_FORWARD: dict[str, Callable[..., torch.Tensor]] = {
    "relu": lambda x: F.relu(x),
    "relu6": lambda x: F.relu6(x),
    "leaky_relu": lambda x, negative_slope: F.leaky_relu(x, negative_slope),
    "elu": lambda x, alpha: F.elu(x, alpha),
    "selu": lambda x: F.selu(x),
    "celu": lambda x, alpha: F.celu(x, alpha),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "mish": lambda x: F.mish(x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": lambda x, beta, threshold: F.softplus(x, beta, threshold),
    "hardswish": lambda x: F.hardswish(x),
    "hardsigmoid": lambda x: F.hardsigmoid(x),
}
# f'(x): torch's own backward kernels with an incoming gradient of 1, so exactly what autograd computes (its
# subgradients at kinks included) in one vectorised pass
_DERIVATIVE: dict[str, Callable[..., torch.Tensor]] = {
    "relu": lambda x: _A.threshold_backward(_one(x), x, 0),
    "relu6": lambda x: _A.hardtanh_backward(_one(x), x, 0.0, 6.0),
    "leaky_relu": lambda x, negative_slope: _A.leaky_relu_backward(_one(x), x, negative_slope, False),
    "elu": lambda x, alpha: _A.elu_backward(_one(x), alpha, 1.0, 1.0, False, x),
    "selu": lambda x: _A.elu_backward(_one(x), SELU_ALPHA, SELU_SCALE, 1.0, False, x),
    "celu": lambda x, alpha: _A.elu_backward(_one(x), alpha, 1.0, 1.0 / alpha, False, x),
    "gelu": lambda x: _A.gelu_backward(_one(x), x),
    "gelu_tanh": lambda x: _A.gelu_backward(_one(x), x, approximate="tanh"),
    "silu": lambda x: _A.silu_backward(_one(x), x),
    "mish": lambda x: _A.mish_backward(_one(x), x),
    "tanh": lambda x: _A.tanh_backward(_one(x), torch.tanh(x)),
    "sigmoid": lambda x: _A.sigmoid_backward(_one(x), torch.sigmoid(x)),
    "softplus": lambda x, beta, threshold: _A.softplus_backward(_one(x), x, beta, threshold),
    "hardswish": lambda x: _A.hardswish_backward(_one(x), x),
    "hardsigmoid": lambda x: _A.hardsigmoid_backward(_one(x), x),
}


def _check(kind: str) -> None:
    if kind not in _FORWARD:
        raise UnsupportedActivationError(unsupported_message(repr(kind)))


def unsupported_message(what: str) -> str:
    return f"anact does not support activation {what}; supported: {', '.join(KINDS)}"


def apply_activation(kind: str, params: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """``f(x)`` for an activation kind (never in place)."""
    _check(kind)
    return _FORWARD[kind](x, **params)


def derivative(kind: str, params: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """``f'(x)``, exactly as torch's autograd computes it (same branches, same value at kinks)."""
    _check(kind)
    return _DERIVATIVE[kind](x, **params)


# ---- recognising modules and functional calls ------------------------------------------------------
_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict[str, Any]]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": float(m.negative_slope)}),
    nn.ELU: lambda m: ("elu", {"alpha": float(m.alpha)}),
    nn.SELU: lambda m: ("selu", {}),
    nn.CELU: lambda m: ("celu", {"alpha": float(m.alpha)}),
    nn.GELU: lambda m: ("gelu_tanh" if m.approximate == "tanh" else "gelu", {}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.Mish: lambda m: ("mish", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Softplus: lambda m: ("softplus", {"beta": float(m.beta), "threshold": float(m.threshold)}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
}
MODULE_CLASSES: tuple[type, ...] = tuple(_MODULES)

# function -> (kind, names of its parameters after the input, in positional order)
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {}
for _names, _spec in (
    (("relu", "relu_"), ("relu", ())),
    (("relu6",), ("relu6", ())),
    (("leaky_relu", "leaky_relu_"), ("leaky_relu", ("negative_slope",))),
    (("elu", "elu_"), ("elu", ("alpha",))),
    (("selu", "selu_"), ("selu", ())),
    (("celu", "celu_"), ("celu", ("alpha",))),
    (("gelu",), ("gelu", ("approximate",))),
    (("silu",), ("silu", ())),
    (("mish",), ("mish", ())),
    (("tanh", "tanh_"), ("tanh", ())),
    (("sigmoid", "sigmoid_"), ("sigmoid", ())),
    (("softplus",), ("softplus", ("beta", "threshold"))),
    (("hardswish",), ("hardswish", ())),
    (("hardsigmoid",), ("hardsigmoid", ())),
):
    for _ns in (F, torch, torch.special):
        for _n in _names:
            _fn = getattr(_ns, _n, None)
            if callable(_fn) and not isinstance(_fn, type):
                _FUNCTIONS.setdefault(_fn, _spec)
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
            "tanh_": "tanh"}


def _from_call(kind: str, names: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[str, dict[str, Any]] | None:
    given = dict(zip(names, args[1:]))
    given.update({k: v for k, v in kwargs.items() if k in names})
    if kind == "gelu":
        approximate = given.pop("approximate", "none")
        if approximate not in ("none", "tanh"):
            return None
        kind = "gelu_tanh" if approximate == "tanh" else "gelu"
    params = dict(DEFAULTS.get(kind, {}))
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # a traced value (an fx Node) or something odd: cannot decide statically
        params[key] = float(value)
    return kind, params


def activation_kind(obj: Any, args: tuple = (), kwargs: dict | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(kind, params)`` for a supported activation, else None.

    ``obj`` is a torch.nn module (exact class: a subclass may change the function, so it is not
    recognised), a functional form (``F.relu``, ``torch.relu_``, ``F.gelu``, ``torch.sigmoid``, ...) or a
    Tensor method name (``"relu"``, ``"sigmoid_"``, ``"tanh"``). For a function, ``args``/``kwargs`` are the
    call's arguments *including the input* (as an fx node holds them); constant parameter values are read
    from them (``F.leaky_relu(x, 0.2)``), defaults fill the rest, and a non-constant one gives None."""
    if isinstance(obj, nn.Module):
        spec = _MODULES.get(type(obj))
        return spec(obj) if spec else None
    if isinstance(obj, str):
        return (_METHODS[obj], {}) if obj in _METHODS else None
    try:
        spec = _FUNCTIONS.get(obj)
    except TypeError:  # unhashable
        return None
    if spec is None:
        return None
    return _from_call(spec[0], spec[1], tuple(args), dict(kwargs or {}))


def describe(obj: Any) -> str:
    """A name for an activation in messages: the qualified class name of a module, a function's name."""
    if isinstance(obj, nn.Module):
        return f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, str):
        return repr(obj)
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)


def resolve_activation(obj: Any, args: tuple = (), kwargs: dict | None = None) -> tuple[str, dict[str, Any]]:
    """Like :func:`activation_kind`, but an unsupported activation raises UnsupportedActivationError."""
    found = activation_kind(obj, args, kwargs)
    if found is None:
        raise UnsupportedActivationError(unsupported_message(describe(obj)))
    return found


def make_activation(kind: str, params: dict[str, Any] | None = None) -> nn.Module:
    """A fresh torch.nn module computing ``kind`` (for functional call sites)."""
    _check(kind)
    p = {**DEFAULTS.get(kind, {}), **(params or {})}
    if kind == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return _CLASS_OF[kind](**p)


_CLASS_OF: dict[str, type] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "selu": nn.SELU,
    "celu": nn.CELU, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
}


# ---- calibration statistics of several torch.distributed workers ---------------------------------------
def sum_over_ranks(acc: dict | None, settings: Any, like: torch.Tensor) -> dict:
    """The calibration sums of every distributed worker, added up (a worker with no data adds zeros). The
    shifted sums are first re-centred on rank 0's shift, so that they can be added."""
    zero = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    acc = acc or {"shift": zero.unsqueeze(-1), "count": 0, "batches": 0}
    s = acc["shift"].squeeze(-1)
    s0 = settings.from_rank0(s.clone())
    n, delta = float(acc["count"]), s - s0
    sx, sx2 = acc.get("sum_x", zero), acc.get("sum_x2", zero)
    out = {"sum_x": sx + n * delta, "sum_x2": sx2 + 2 * delta * sx + n * delta.square()}
    out.update({k: acc.get(k, zero) for k in ("sum_f", "sum_f2", "sum_fp2")})
    out = {k: settings.sum(v.clone()) for k, v in out.items()}
    counts = settings.sum(torch.tensor([n, float(acc["batches"])], dtype=torch.float64))
    return {**out, "shift": s0.unsqueeze(-1), "count": int(counts[0].item()), "batches": int(counts[1].item())}
