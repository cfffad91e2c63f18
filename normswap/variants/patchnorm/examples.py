"""The models the contract test suite converts to PatchNorm: Conv/Linear -> BN pairs, depthwise, timm layers."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorms(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics (and affine parameters) in every BatchNorm, drawn from ``gen``; eval mode.
    Random init has mean 0 and variance 1, with which folding a BatchNorm would prove nothing."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def examples() -> list[tuple[nn.Module, torch.Tensor]]:
    """Small eval-mode models with Conv/Linear -> BN pairs (non-trivial running statistics)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
        )
        mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        seq = nn.Sequential(nn.Conv1d(4, 6, 5, padding=2, padding_mode="reflect"), nn.BatchNorm1d(6), nn.ReLU(),
                            nn.Conv1d(6, 3, 1))
        dw = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
                           nn.Conv2d(6, 4, 1))
        out = [
            (randomize_batchnorms(cnn, gen), torch.randn(4, 3, 12, 12)),
            (randomize_batchnorms(mlp, gen), torch.randn(8, 10)),
            (randomize_batchnorms(seq, gen), torch.randn(2, 4, 20)),
            (randomize_batchnorms(dw, gen), torch.randn(2, 6, 10, 10)),
        ]
        try:  # timm is optional: its adapters are then simply not exercised
            from normswap.compat import import_torchvision

            import_torchvision()
            from timm.layers import BatchNormAct2d, Conv2dSame
        except ImportError:
            return out
        # a tiny tf_efficientnet stand-in: dynamic same-padding stem, norm + activation layers (one without act)
        effnet = nn.Sequential(
            Conv2dSame(3, 8, 3, stride=2, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), BatchNormAct2d(8),
            nn.Conv2d(8, 4, 1, bias=False), BatchNormAct2d(4, apply_act=False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )
        return out + [(randomize_batchnorms(effnet, gen), torch.randn(2, 3, 11, 13))]
