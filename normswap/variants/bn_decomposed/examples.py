"""The models the contract test suite converts to ``recenter`` and ``rescale``."""

from __future__ import annotations

import torch
from torch import nn

from normswap.variants.bn import settle_batchnorms


def examples() -> list[tuple[nn.Module, torch.Tensor]]:
    """Eval-mode models holding BatchNorm1d (2-d and 3-d inputs), BatchNorm2d (with and without affine) and
    BatchNorm3d, with non-trivial running statistics, each with an example input."""
    out: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
        x = torch.randn(4, 3, 12, 12)
        out.append((settle_batchnorms(cnn, x), x))
        mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(8, 10)
        out.append((settle_batchnorms(mlp, x), x))
        seq = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Conv1d(4, 3, 1))
        x = torch.randn(3, 2, 9)
        out.append((settle_batchnorms(seq, x), x))
        vol = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
        x = torch.randn(2, 2, 4, 6, 6)
        out.append((settle_batchnorms(vol, x), x))
    return out
