"""A converted PatchNorm model in eval mode with autograd off traces: ``torch.fx.symbolic_trace`` and
``torch.compile(fullgraph=True)`` give the eager output (the cached and native inference paths are for eager calls
only; traced, every layer is its plain formula, or the fusable depthwise expression under the compiler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap


class Mixed(nn.Module):
    """A dense 3x3, a depthwise 3x3 (stride 2), a 1x1 conv (each with its BatchNorm) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def converted() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = Mixed().eval()
    x = torch.randn(2, 8, 20, 20)
    out = normswap.convert(m, to="patchnorm", strength=1.0, example_inputs=x).model.eval()
    return out, x


def test_symbolic_trace_under_no_grad(converted) -> None:
    model, x = converted
    with torch.no_grad():
        want = model(x)
        graph = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(graph(x), want, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_under_no_grad() -> None:
    """A groups=1 conv and a Linear (the layers whose cached path failed under the compiler): a small graph."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Flatten(1),
                      nn.Linear(8 * 36, 3)).eval()
    x = torch.randn(2, 4, 6, 6)
    model = normswap.convert(m, to="patchnorm", strength=1.0, example_inputs=x).model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
