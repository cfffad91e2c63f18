"""The models the contract test suite converts to ANAct: folded, unfolded and residual activation sites."""

from __future__ import annotations

import torch
from torch import nn


class ResidualExample(nn.Module):
    """``head(gelu(h + fc2(h)))``, ``h = relu(fc1(x))``: an unfolded ReLU (it feeds a residual add) before a
    folded GELU (it feeds only ``head``). One of :func:`examples`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2, self.gelu, self.head = (
            nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(x))
        return self.head(self.gelu(h + self.fc2(h)))


def examples() -> list[tuple[nn.Module, torch.Tensor]]:
    """Small eval-mode models with activation sites, each with an example input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [
            (nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval(), torch.randn(8, 6)),
            (nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU(), nn.Conv2d(8, 5, 1)).eval(), torch.randn(2, 3, 6, 6)),
            (nn.Sequential(nn.Linear(6, 10), nn.SiLU(), nn.Linear(10, 3)).eval(), torch.randn(8, 6)),
            (ResidualExample().eval(), torch.randn(8, 6)),  # an unfolded site (residual add) before a folded one
        ]
