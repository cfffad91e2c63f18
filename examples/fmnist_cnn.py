"""A small BatchNorm CNN trained on Fashion-MNIST: a real trained model to convert and calibrate offline.

    .venv/bin/python examples/fmnist_cnn.py            # train once (about a minute on 2 cores), cached
    normswap convert examples/fmnist_cnn.py:build --weights .cache/models/fmnist_cnn.safetensors \\
        --to uan --calibrate fashion-mnist -o fmnist-uan.safetensors
    normswap finetune recipes/fmnist-uan.yaml           # model.source: examples/fmnist_cnn.py:pretrained

The architecture has every pattern normswap converts: Conv->BN->ReLU blocks (folded pairs for PatchNorm,
BatchNorm2d for UAN, ReLU for ANAct), a Linear->BatchNorm1d->ReLU head. Training is seeded; the cache
file name carries a hash of this file, so editing it retrains.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "models"


def build() -> nn.Module:
    """The architecture (random init, eval mode): input (N, 1, 28, 28), 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()


def weights_path() -> Path:
    """Where the trained weights are cached (the name changes when this file changes)."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return CACHE / f"fmnist_cnn-{digest}.safetensors"


def train(epochs: int = 1, batch_size: int = 128, seed: int = 0, verbose: bool = True) -> Path:
    """Train on the Fashion-MNIST train split (seeded), save atomically, return the weights file."""
    from safetensors.torch import save_file

    from normswap.data import open_data

    out = weights_path()
    if out.is_file():
        return out
    torch.manual_seed(seed)
    data = open_data("fashion-mnist", calib_samples=60000, eval_samples=10000, seed=seed)
    model = build().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for epoch in range(epochs):
        for step, (x, y) in enumerate(data.batches("calibration", batch_size)):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if verbose and step % 100 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.batches("evaluation", 512):
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    if verbose:
        print(f"test accuracy {correct / total:.4f} after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return out


def pretrained() -> nn.Module:
    """The trained model (eval mode): trains once and caches if needed. The fine-tuning recipes use this factory
    (``model.source: examples/fmnist_cnn.py:pretrained``)."""
    from safetensors.torch import load_file

    model = build()
    model.load_state_dict(load_file(str(train(verbose=False))))
    return model.eval()


if __name__ == "__main__":
    print(train())
