"""``load`` builds the architecture without the random initialisation its file overwrites
(normswap/api/skipinit.py), and the loaded model is the one a normal build gives, tensor for tensor, non-persistent
buffers included; where the skip could show, the normal build decides."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normswap
from normswap.api import conversion
from normswap.api.skipinit import build_uninitialised

from conftest import require_module


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(model.named_buffers(remove_duplicate=False))
    found.update(model.named_parameters(remove_duplicate=False))
    return found


def _loads(path, monkeypatch) -> tuple[nn.Module, nn.Module, list[bool]]:
    """The file loaded as now (recording whether the skip stood) and with the normal build."""
    took: list[bool] = []

    def spy(build):
        model = build_uninitialised(build)
        took.append(model is not None)
        return model

    with monkeypatch.context() as m:
        m.setattr(conversion, "build_uninitialised", spy)
        fast = normswap.load(path)
    with monkeypatch.context() as m:
        m.setattr(conversion, "build_uninitialised", lambda build: None)
        normal = normswap.load(path)
    return fast, normal, took


def _specs(tmp_path) -> list[tuple[str, str, str]]:
    specs = [("resnet50", "uan", ""), ("mobilenet_v2", "anact", "")]
    timm = None
    try:
        timm = require_module("timm")
    except BaseException:  # noqa: BLE001  (skipped where timm is missing: the others still run)
        pass
    if timm is not None:  # 17 non-persistent buffers (relative position indexes, attention masks)
        specs.append(("timm:swin_tiny_patch4_window7_224", "uan", "non-persistent"))
    return specs


@pytest.mark.parametrize("i", range(3))
def test_load_is_bit_identical_to_a_normal_build(i, tmp_path, monkeypatch):
    specs = _specs(tmp_path)
    if i >= len(specs):
        pytest.skip("timm is not installed")
    spec, to, _ = specs[i]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = normswap.convert(spec, to=to, weights="none").save(tmp_path / "m.safetensors")
    fast, normal, took = _loads(path, monkeypatch)
    assert took == [True]
    a, b = _tensors(fast), _tensors(normal)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in normal.named_modules()]


def test_hugging_face_bert_with_its_non_persistent_position_ids(tmp_path, monkeypatch):
    transformers = require_module("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64)
    transformers.BertModel(cfg).eval().save_pretrained(tmp_path / "bert")
    path = normswap.convert(f"hf:{tmp_path / 'bert'}", to="uan").save(tmp_path / "bert.safetensors")
    fast, normal, took = _loads(path, monkeypatch)
    assert took == [True]
    a, b = _tensors(fast), _tensors(normal)
    assert any(k not in fast.state_dict() for k in a)  # position_ids: computed, not in the file
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).last_hidden_state, normal(input_ids=ids).last_hidden_state)


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        nn.init.trunc_normal_(self.lin.weight, mean=0.0, std=5.0, a=1.0, b=10.0)  # a rejection loop on its draws
        self.register_buffer("pos", torch.arange(3.0), persistent=False)  # computed: kept


class _RandomBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("proj", nn.init.normal_(torch.empty(3, 3)), persistent=False)


class _ReadsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = float(self.lin.weight.abs().max())  # derived from the initial weights


class _DrawsDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("noise", torch.randn(3), persistent=False)


class _Temporary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for _ in range(3):
            nn.Linear(64, 64)  # built and dropped, as timm's builders do
        self.lin = nn.Linear(64, 64)


def test_the_skip_stands_only_where_nothing_could_tell():
    state = torch.get_rng_state()
    model = build_uninitialised(_Plain)
    assert isinstance(model, _Plain) and torch.equal(model.pos, torch.arange(3.0))
    assert torch.equal(state, torch.get_rng_state())  # no draw at all
    assert isinstance(build_uninitialised(_Temporary), _Temporary)
    for cls in (_RandomBuffer, _ReadsWeights, _DrawsDirectly):
        assert build_uninitialised(cls) is None, cls.__name__

    def broken() -> nn.Module:
        raise RuntimeError("the builder's own error")
    assert build_uninitialised(broken) is None  # the normal build raises it
    # nothing stays patched: initialisers draw again
    assert torch.nn.init.normal_.__module__ == "torch.nn.init"
    torch.manual_seed(1)
    w = torch.nn.init.normal_(torch.empty(5))
    torch.manual_seed(1)
    assert torch.equal(w, torch.randn(5)) and not torch.equal(torch.empty(8).normal_(), torch.zeros(8))


def test_other_threads_initialise_as_usual_meanwhile():
    import threading

    seen: list[torch.Tensor] = []
    started, release = threading.Event(), threading.Event()

    def other() -> None:
        started.wait()  # its own generator: the global one changing would (rightly) make the build fall back
        seen.append(nn.init.normal_(torch.empty(4), generator=torch.Generator().manual_seed(3)).clone())
        release.set()

    def slow() -> nn.Module:
        started.set()
        release.wait(10)
        return _Plain()

    thread = threading.Thread(target=other)
    thread.start()
    assert build_uninitialised(slow) is not None
    thread.join()
    assert torch.equal(seen[0], torch.randn(4, generator=torch.Generator().manual_seed(3)))
