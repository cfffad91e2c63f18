"""The models the contract test suite converts to UAN: every source kind it accepts, with non-trivial statistics."""

from __future__ import annotations

import torch
from torch import nn

from normswap.variants.bn import settle_batchnorms


def examples() -> list[tuple[nn.Module, torch.Tensor]]:
    """Small eval-mode models holding every source kind UAN accepts, each with an example input."""
    out: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
        )
        x = torch.randn(4, 3, 12, 12)
        out.append((settle_batchnorms(cnn, x), x))
        mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(8, 10)
        out.append((settle_batchnorms(mlp, x), x))
        vol = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
        x = torch.randn(2, 2, 4, 6, 6)
        out.append((settle_batchnorms(vol, x), x))
        tokens = nn.Sequential(
            nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(),
            nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 4),
        )
        with torch.no_grad():
            tokens[1].weight.uniform_(0.5, 1.5)
            tokens[1].bias.normal_(0.0, 0.2)
        out.append((tokens.eval(), torch.randn(2, 5, 8)))
        try:
            from normswap.compat import import_torchvision

            import_torchvision()
            from timm.layers import BatchNormAct2d, LayerNorm2d
            from torchvision.ops.misc import FrozenBatchNorm2d
        except ImportError:  # timm is optional: its kinds are then simply not exercised
            return out
        frozen = FrozenBatchNorm2d(6)
        with torch.no_grad():
            for buf, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.3, 0.3), ("running_mean", -1, 1),
                                ("running_var", 0.5, 2)):
                getattr(frozen, buf).uniform_(lo, hi)
        ln2d = LayerNorm2d(6)
        with torch.no_grad():
            ln2d.weight.uniform_(0.5, 1.5)
        convnet = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6), frozen, nn.Conv2d(6, 6, 1), ln2d)
        x = torch.randn(4, 3, 8, 8)
        out.append((settle_batchnorms(convnet, x), x))
    return out
