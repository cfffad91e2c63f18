"""Batch Normalization Decomposed in a deep random MLP: recentering + ReLU collapses a batch into one tight
cluster plus one orthogonal odd sample; full BatchNorm (batch statistics) does not (docs/diagnose.md).

    .venv/bin/python examples/bn_decomposed_mlp.py [OUT_DIR]     # default .cache/diagnose-mlp

Width 128, depth 200, batch 16, bias-free Linear layers with He-Gaussian initialisation (std sqrt(2/128)),
BatchNorm1d(affine=False) + ReLU; the ``recenter`` variant at strength 1 keeps only BatchNorm's recentering.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

import normswap


def build(depth: int = 200, width: int = 128, seed: int = 0) -> nn.Sequential:
    """The deep random MLP: ``depth`` x (Linear without bias, He-Gaussian; BatchNorm1d without affine; ReLU)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False)
        nn.init.normal_(lin.weight, 0.0, math.sqrt(2 / width))
        layers += [lin, nn.BatchNorm1d(width, affine=False), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main(out: str = ".cache/diagnose-mlp") -> object:
    model = build()
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    recenter = normswap.convert(model, to="recenter", strength=1.0, example_inputs=x).model
    report = normswap.diagnose(recenter, x, compare=[model], batch_stats=True,
                               labels=["recenter + ReLU", "BatchNorm + ReLU"], out=out, force=True)
    print(report.render())
    return report


if __name__ == "__main__":
    main(*sys.argv[1:])
