"""PatchNorm's inference path (normswap/variants/patchnorm/fast.py): the cached gain-scaled weight, the chunked
batch and the channel-sum chain give the plain formula (the unfold reference) on every conv geometry, and the
cache follows every change of the tensors it was built from. These tests run the eager path (the native kernels
off); the reference test runs with them on as well (tests/test_patchnorm_native.py compares the two)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap.native as native
from normswap.variants.cache import cache_for
from normswap.variants.patchnorm import fast as _fast, layer as _patch
from normswap.variants.patchnorm.variant import PatchNormConv, PatchNormLinear
from tests.test_native import require_library
from tests.test_patchnorm import D, FORMS, GEOMETRIES, _conv, _perturb, _x

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


@pytest.fixture(autouse=True)
def _eager():
    """The eager path: the native kernels off (a test may turn them on), restored afterwards."""
    native.set_enabled(False)
    yield
    native.set_enabled(None)


def _n2_mean(m: PatchNormConv | PatchNormLinear) -> None:
    with torch.no_grad():  # a strength-aware scale k != 1, so that it is part of what the cache holds
        m.n2_mean.copy_(torch.rand(m.n2_mean.shape, dtype=m.n2_mean.dtype) * 5 + 1)


@pytest.mark.parametrize("on", (False, True), ids=("eager", "native"))
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"{g[0]}d-{g[3]}")
def test_chunked_and_chained_paths_match_the_reference(geo, on, monkeypatch):
    """One sample per chunk (any conv with one channel per group) and the addcmul channel sum (groups=1 convs)
    forced on small inputs: every form, strength and offset against the unfold reference; and the same with the
    native kernels on (where they take the geometry)."""
    if on:
        require_library()
        native.set_enabled(True)
    monkeypatch.setattr(_fast, "CHUNK_BYTES", 1)
    monkeypatch.setattr(_patch, "CHAIN_MIN_SLICE", 1)
    dims, cin, cout, kw = geo
    conv, x = _conv(dims, cin, cout, kw), _x(dims, cin, n=3)
    for form in FORMS:
        for strength, offset in ((1.0, False), (0.6, True), (0.25, False)):
            m = _perturb(PatchNormConv.from_conv(conv, form=form, offset=offset, strength=strength)).eval()
            _n2_mean(m)
            with torch.no_grad():
                out = m(x)
            with torch.inference_mode():
                again = m(x)
            ref = _patch._reference_forward(m, x)
            assert out.shape == ref.shape == conv(x).shape and out.is_contiguous()
            assert (out - ref).abs().max() < 1e-10, (form, strength, offset)
            assert torch.equal(out, again)


def test_chunks_are_taken_where_the_norm_needs_a_box_filter(monkeypatch):
    """Depthwise kxk convs go chunk by chunk (each chunk's conv seen by the conv call), groups=1 and 1x1 convs
    run on the whole batch."""
    monkeypatch.setattr(_fast, "CHUNK_BYTES", 1)
    x = torch.randn(4, 6, 8, 8, dtype=D)
    for conv, chunks in ((nn.Conv2d(6, 6, 3, padding=1, groups=6), 4), (nn.Conv2d(6, 4, 3, padding=1), 1),
                         (nn.Conv2d(6, 6, 1, groups=6), 1)):
        m = PatchNormConv.from_conv(conv.to(D), strength=1.0).eval()
        batches: list[int] = []
        geom = m.geom
        real = geom.conv
        object.__setattr__(geom, "conv", lambda xi, *a, real=real: batches.append(xi.shape[0]) or real(xi, *a))
        with torch.no_grad():
            out = m(x)
        assert len(batches) == chunks and sum(batches) == 4
        assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10


def test_channel_chain_equals_vecdot(monkeypatch):
    monkeypatch.setattr(_patch, "CHAIN_MIN_SLICE", 1)
    x = torch.randn(2, 7, 5, 3, dtype=D)
    with torch.no_grad():
        chained = _patch._group_sq_sum(x, 1, 7)
    with_grad = _patch._group_sq_sum(x.requires_grad_(), 1, 7)  # autograd on: vecdot, differentiable
    assert torch.allclose(chained, x.detach().square().sum(1, keepdim=True), atol=1e-12)
    assert with_grad.grad_fn is not None and torch.allclose(with_grad, chained, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_linear_inference_matches_the_training_path(form):
    torch.manual_seed(0)
    lin = _perturb(PatchNormLinear(6, 5, form=form, offset=True, strength=0.7).to(D)).eval()
    _n2_mean(lin)
    x = torch.randn(3, 4, 6, dtype=D)
    plain = lin(x)  # autograd on: the training formula
    with torch.no_grad():
        assert (lin(x) - plain).abs().max() < 1e-12


def _inplace(name: str, op: str, value: float):
    """An in-place change of the tensor ``name`` (what an optimiser or a calibration write does)."""
    def change(m):
        with torch.no_grad():
            getattr(getattr(m, name), op)(value)
    change.__name__ = name
    return change


def _changes() -> list:
    """In-place changes of each tensor the cached terms come from, and the strength."""
    def strength(m):
        m.set_strength(0.5)

    def state_dict(m):
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd["gain"] = sd["gain"] * 2
        m.load_state_dict(sd)

    def replaced(m):
        m.weight = nn.Parameter(m.weight.detach() * 2)

    def train_step(m):  # training mode tracks n2_mean, an optimiser moves the weight
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.randn(2, 4, 6, 6, dtype=D)).square().sum().backward()
        opt.step()
        m.eval()

    return [_inplace("weight", "mul_", 1.5), _inplace("bias", "add_", 0.3), _inplace("gain", "mul_", 0.5),
            _inplace("offset", "add_", 1.0), _inplace("n2_mean", "mul_", 3.0), strength, state_dict, replaced,
            train_step]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_cache_follows_every_change(change):
    torch.manual_seed(0)
    m = _perturb(PatchNormConv(4, 6, 3, padding=1, groups=2, offset=True, strength=1.0, dtype=D)).eval()
    _n2_mean(m)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    with torch.no_grad():
        before = m(x)
        assert torch.equal(m(x), before) and cache_for(m).key is not None  # cached, and the same
    change(m)
    with torch.no_grad():
        after = m(x)
    assert not torch.allclose(after, before)
    assert (after - _patch._reference_forward(m, x)).abs().max() < 1e-10


def test_cache_follows_dtype_and_copies():
    torch.manual_seed(0)
    m = _perturb(PatchNormConv(4, 6, 3, padding=1, strength=1.0)).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        m(x)
        twin = copy.deepcopy(m)
        with torch.no_grad():
            twin.gain.mul_(2)
        assert not torch.allclose(twin(x), m(x))  # the copy's cache is keyed on its own tensors
        m.to(D)
        out = m(x.to(D))
    assert out.dtype == D and (out - _patch._reference_forward(m, x.to(D))).abs().max() < 1e-10


def test_parameters_made_under_inference_mode_are_not_cached():
    with torch.inference_mode():
        m = PatchNormConv(4, 6, 3, padding=1, strength=1.0, dtype=D).eval()
        x = torch.randn(2, 4, 6, 6, dtype=D)
        out = m(x)
        assert cache_for(m).key is None
        m.gain.mul_(2)  # no version counter to see this: the terms are rebuilt on every call
        assert torch.allclose(m(x), 2 * out)


@pytest.mark.parametrize("geo", [g for g in GEOMETRIES if g[3].get("groups", 1) == g[1]], ids=str)
def test_depthwise_gradients_in_float64_match_autograd_of_the_plain_formula(geo):
    """The depthwise geometries in training mode: gradients of input and every parameter against autograd
    of the unfold reference (the inference path has no autograd; this is what training runs)."""
    dims, cin, cout, kw = geo
    m = _perturb(PatchNormConv.from_conv(_conv(dims, cin, cout, kw), offset=True, strength=0.8)).train()
    x = _x(dims, cin).requires_grad_()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(m(x).square().sum(), [x, *params])
    m.eval()  # the reference reads n2_mean as the forward above left it
    ref = torch.autograd.grad(_patch._reference_forward(m, x).square().sum(), [x, *params])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_calibration_terms_take_the_chunked_patch_norms(monkeypatch):
    """The observer's n2 of a depthwise conv, one sample per chunk, is the unfold reference's (and its terms
    those of the unchunked run)."""
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4).to(D)
    m = PatchNormConv.from_conv(conv, strength=0.0)
    x = torch.randn(3, 4, 9, 9, dtype=D)
    with torch.no_grad():
        whole = m._calib_terms(x, 1.0)
        monkeypatch.setattr(_fast, "CHUNK_BYTES", 1)
        assert _fast.chunk_step(x, m.geom) == 1
        chunked = m._calib_terms(x, 1.0)
    assert (chunked[3] - _patch._reference_n2(x, m.geom)).abs().max() < 1e-10
    for a, b in zip(whole, chunked):
        assert (a is None and b is None) or (a - b).abs().max() < 1e-10
