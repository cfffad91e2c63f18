"""Convert a custom nn.Module and a torch.fx GraphModule to UAN, verify, save and reload.

Run: .venv/bin/python examples/custom_model.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import fx, nn

import normswap


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.pool = nn.AdaptiveAvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def main() -> None:
    torch.manual_seed(0)
    model = Net()
    model.train()
    for _ in range(3):  # give the BatchNorms real running statistics
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    x = torch.randn(4, 3, 32, 32)

    # 1. a plain nn.Module: every BatchNorm becomes UAN (K = 4), exactly
    result = normswap.convert(model, to="uan", options={"k": 4}, example_inputs=x)
    print(result.report.render())
    with tempfile.TemporaryDirectory() as tmp:
        path = result.save(Path(tmp) / "net-uan.safetensors")
        loaded = normswap.load(path, model=Net())  # custom code: pass the architecture
        with torch.no_grad():
            print("reload max |diff|:", float((loaded(x) - result.model(x)).abs().max()))

    # 2. an fx.GraphModule (e.g. after your own graph passes), only the head's BatchNorm1d
    gm = fx.symbolic_trace(model)
    result = normswap.convert(gm, to="uan", targets=["BatchNorm1d"], example_inputs=x)
    print(type(result.model).__name__, [s.name for s in result.plan.converted], "ok" if result.report.ok else "FAILED")


if __name__ == "__main__":
    main()
