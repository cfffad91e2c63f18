"""One probe forward pass: the positional and keyword arguments a model is called with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProbeInput:
    """Positional and keyword arguments of one probe forward pass."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in self.args if torch.is_tensor(a)]
        parts += [f"{k}={tuple(v.shape)}" for k, v in self.kwargs.items() if torch.is_tensor(v)]
        return ", ".join(parts) or "no tensors"
