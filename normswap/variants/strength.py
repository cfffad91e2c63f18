"""The strength: the one homotopy parameter every variant has (docs/methods.md section 0).

Strength 0 is an exact copy of the pretrained function, 1 the paper's layer. A variant keeps it as a float32
scalar buffer, so it travels in the state_dict (older files name it ``rho`` for UAN and ``lam`` for
PatchNorm, the symbols of their papers, and keep those keys), plus a Python float mirror that decides the
branches of ``forward`` without a device sync: :class:`StrengthMirror` holds both.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from normswap.errors import OptionError

__all__ = ["StrengthMirror", "check_strength", "set_strengths", "strength_buffer", "strengths_of"]


def check_strength(value: float) -> float:
    """``value`` as a float in [0, 1], or an OptionError naming it."""
    s = float(value)
    if not 0.0 <= s <= 1.0:
        raise OptionError(f"strength must be in [0, 1]; got {s}")
    return s


def strength_buffer(value: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 scalar buffer for a homotopy parameter, on ``like``'s device."""
    device = like.device if like is not None else None
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class StrengthMirror:
    """Mixin for a variant module: the strength buffer (state_dict key :attr:`strength_key`) and its mirror.

    Call :meth:`init_strength` in ``__init__``; :meth:`set_strength`, :meth:`current_strength` and loading a
    state_dict keep the two in step. :meth:`strength_changed` is the hook for what a variant derives from it."""

    strength_key: ClassVar[str] = "strength"
    _s: float = 0.0

    def init_strength(self, value: float, like: torch.Tensor | None = None) -> None:
        """Register the buffer at ``value`` (checked to be in [0, 1]) on ``like``'s device."""
        self.register_buffer(self.strength_key, strength_buffer(check_strength(value), like=like))  # type: ignore[attr-defined]
        self._mirror()

    def _mirror(self) -> None:
        self._s = float(getattr(self, self.strength_key))
        self.strength_changed(self._s)

    def strength_changed(self, value: float) -> None:
        """Called with the new (float32-rounded) strength whenever it changes."""

    def set_strength(self, strength: float) -> None:
        """Set the homotopy parameter: 0 = the exact source function, 1 = the paper's layer."""
        s = check_strength(strength)
        with torch.no_grad():
            getattr(self, self.strength_key).fill_(s)
        self._mirror()

    def current_strength(self) -> float:
        """The strength the module runs at now (what :meth:`set_strength` last set)."""
        return self._s

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if getattr(self, self.strength_key).device.type != "meta":
            self._mirror()


def strengths_of(model: nn.Module) -> dict[nn.Module, float]:
    """Every variant module's current strength."""
    return {m: m.current_strength() for m in model.modules() if getattr(m, "normswap_leaf", False)}


def set_strengths(model: nn.Module, value: float | dict[nn.Module, float]) -> None:
    """Set every variant module to ``value`` (one float, or a module -> strength map from :func:`strengths_of`)."""
    for m in model.modules():
        if getattr(m, "normswap_leaf", False):
            m.set_strength(value[m] if isinstance(value, dict) else value)
