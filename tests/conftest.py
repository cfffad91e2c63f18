"""Shared fixtures: small real architectures, offline settings, real photos. The asset policy (skip locally,
fail in CI) and the network guard (no test reaches beyond localhost) live in tests/guards.py and are active here
(docs/testing.md)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import normswap  # noqa: E402,F401  (repairs the torchvision import first)
from normswap.compat import import_torchvision  # noqa: E402

from guards import (_no_network_reached, assets_required, missing_asset, pytest_runtest_setup,  # noqa: E402,F401
                    pytest_sessionstart, require_module)

tv = import_torchvision()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (so exactness means something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class SmallCNN(nn.Module):
    """Conv->BN->ReLU blocks, a residual add (conv output with two users), and a BN1d MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 5))
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.conv(x)
        x = torch.relu(self.bn(y) + y)  # the conv output has two users: not a foldable pair
        return self.head(self.pool(x))


class ControlFlowNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the module walk must take over."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.alt = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.mean() > 0:
            x = self.alt(x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallCNN())


@pytest.fixture
def control_flow_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ControlFlowNet())


@pytest.fixture
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                    num_classes=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand_like(mod.weight) + 0.5)
                mod.bias.copy_(torch.randn_like(mod.bias) * 0.1)
    return m.eval()


def pretrained_mobilenet_available() -> bool:
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth")
    return os.path.isfile(hub)


@pytest.fixture
def mobilenet_weights() -> None:
    if not pretrained_mobilenet_available():
        missing_asset("the offline MobileNetV2 IMAGENET1K_V1 weights (torch's hub cache)")


needs_mobilenet = pytest.mark.usefixtures("mobilenet_weights")


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """Real photos (scikit-image, offline) as ImageNet-normalised 224x224 centre and corner crops."""
    skdata = require_module("skimage.data")
    weights = tv.models.MobileNet_V2_Weights.IMAGENET1K_V1
    tf = weights.transforms()
    crops = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float() / 255.0
        crops.append(tf(img))
        h, w = img.shape[1:]
        s = min(h, w) * 3 // 4
        crops.append(tf(img[:, :s, :s]))
    return torch.stack(crops)


def fashion_mnist_available() -> bool:
    from normswap.data.fmnist import locate
    from normswap.errors import NormswapError

    try:
        locate("test")
        return True
    except NormswapError:
        return False


@pytest.fixture
def fmnist_data() -> None:
    if not fashion_mnist_available():
        missing_asset("Fashion-MNIST", "run scripts/setup.sh: Debian dataset-fashion-mnist")


needs_fmnist = pytest.mark.usefixtures("fmnist_data")


@pytest.fixture(scope="session")
def fmnist_weights() -> str:
    """The small BatchNorm CNN of examples/fmnist_cnn.py trained on Fashion-MNIST (trained once, about a minute
    on 2 cores, then cached under .cache/models)."""
    import importlib.util
    from pathlib import Path

    if not fashion_mnist_available():
        missing_asset("Fashion-MNIST", "run scripts/setup.sh: Debian dataset-fashion-mnist")
    path = Path(__file__).resolve().parent.parent / "examples" / "fmnist_cnn.py"
    spec = importlib.util.spec_from_file_location("fmnist_cnn_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.train(verbose=False))


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """resnet18 (random init) with one BatchNorm converted to UAN, saved: a file with a torchvision source."""
    import warnings

    from normswap.sources import RandomInitWarning

    path = tmp_path_factory.mktemp("r18") / "r18.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        normswap.convert("resnet18", to="uan", weights="none", targets=["layer4.1.bn2"]).save(path)
    return path


@pytest.fixture(scope="module")
def small_cnn_uan_file(tmp_path_factory):
    """``(path, model)``: SmallCNN with random BatchNorm statistics, converted to UAN and saved."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    normswap.convert(model, to="uan", example_inputs=torch.randn(2, 3, 16, 16)).save(path)
    return path, model


@pytest.fixture(params=["eager", "native"])
def kernels(request):
    """Runs a test twice: with the native kernels off (the eager torch paths) and required (skipped through
    ``missing_asset`` where the library cannot be built); the switch goes back to ``NORMSWAP_NATIVE`` after."""
    import normswap.native as native

    if request.param == "native":
        try:
            native.build()
        except native.NativeBuildError as e:
            missing_asset(f"normswap's native library ({e})", "run scripts/setup.sh on a machine with g++")
    native.set_enabled(request.param == "native")
    yield request.param
    native.set_enabled(None)
