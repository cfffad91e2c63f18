"""PatchNorm's opt-in compiled depthwise kernel (normswap/variants/patchnorm/fused.py): the tap expression is the
plain formula (the unfold reference) on every depthwise geometry, its float64 gradients equal autograd of the
plain formula, the compiled layer gives the reference's output, and a compile failure falls back to the eager
path with a warning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap.native as native
from normswap.variants.patchnorm import fast as _fast, fused as _fused, layer as _patch
from normswap.variants.patchnorm.variant import PatchNormConv
from tests.test_patchnorm import FORMS, GEOMETRIES, _conv, _perturb, _x

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
DEPTHWISE = [g for g in GEOMETRIES if g[3].get("groups", 1) == g[1]]


@pytest.fixture(autouse=True)
def _switch():
    """Every test leaves the process's switch and compiled function as it found them; the native kernels, which
    take precedence over the compiled one, are off."""
    saved = dict(_fused._STATE)
    native.set_enabled(False)
    yield
    native.set_enabled(None)
    _fused._STATE.update(saved)


def _layer(geo, form: str, strength: float = 0.7, offset: bool = True) -> PatchNormConv:
    dims, cin, cout, kw = geo
    m = _perturb(PatchNormConv.from_conv(_conv(dims, cin, cout, kw), form=form, offset=offset, strength=strength))
    with torch.no_grad():
        m.n2_mean.copy_(torch.rand(m.n2_mean.shape, dtype=m.n2_mean.dtype) * 5 + 1)  # k(lam) != 1
    return m.eval()


def _taps(m: PatchNormConv, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through :func:`fused.depthwise_taps`, eagerly (autograd follows the parameters)."""
    w, b, post = _fast.scaled_terms(m, (-1, *([1] * m.geom.dims)))
    coef = torch.tensor(_fused.coefficients(m.form, m._s, m.eps, m._r), dtype=x.dtype)
    planes, out = _fused.phases(m.geom.prepare(x)[0], m.geom)
    y = _fused.depthwise_taps(planes, w, b, coef, m.geom.stride, m.geom.dilation, out)
    return y if post is None else y + post


@pytest.mark.parametrize("geo", DEPTHWISE, ids=str)
def test_tap_expression_is_the_plain_formula(geo):
    """Every depthwise geometry (1-3 dims, multiplier 2, stride, dilation, every padding mode, "same"), every
    form, strength and offset: the tap expression against the unfold reference in float64."""
    x = _x(geo[0], geo[1], n=3)
    for form in FORMS:
        for strength, offset in ((1.0, False), (0.6, True)):
            m = _layer(geo, form, strength, offset)
            with torch.no_grad():
                out = _taps(m, x)
            ref = _patch._reference_forward(m, x)
            assert out.shape == ref.shape
            assert (out - ref).abs().max() < 1e-10, (form, strength, offset)


@pytest.mark.parametrize("geo", DEPTHWISE, ids=str)
def test_tap_expression_gradients_match_autograd_of_the_plain_formula(geo):
    """float64 gradients of the input and every parameter through the tap expression against autograd of the
    unfold reference: the expression the compiler fuses is differentiable as it stands."""
    for form in FORMS:
        m = _layer(geo, form)
        x = _x(geo[0], geo[1]).requires_grad_()
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(_taps(m, x).square().sum(), [x, *params])
        ref = torch.autograd.grad(_patch._reference_forward(m, x).square().sum(), [x, *params])
        for a, b in zip(grads, ref):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), form


def test_supports_only_stride_one_large_float_maps():
    """Stride 2 (gathered taps), small maps (call overhead), half inputs and groups=1 convs keep the eager path."""
    dw = PatchNormConv.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4), strength=1.0).geom
    strided = PatchNormConv.from_conv(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), strength=1.0).geom
    dense = PatchNormConv.from_conv(nn.Conv2d(4, 4, 3, padding=1), strength=1.0).geom
    big, small = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 8, 8)
    assert _fused.supports(dw, big) and _fused.supports(dw, big.double())
    assert not _fused.supports(dw, small) and not _fused.supports(dw, big.half())
    assert not _fused.supports(strided, big) and not _fused.supports(dense, big)


def test_switch_reads_the_environment(monkeypatch):
    from normswap.variants.uan import fused as uan_fused

    monkeypatch.setitem(uan_fused._STATE, "enabled", None)
    for value, on in (("1", True), ("on", True), (" TRUE ", True), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv("NORMSWAP_COMPILE", value)
        _fused._STATE["enabled"] = uan_fused._STATE["enabled"] = None
        assert _fused.compiled_enabled() is on and uan_fused.compiled_enabled() is on  # one switch, both variants
    _fused.set_compiled(True)
    monkeypatch.setenv("NORMSWAP_COMPILE", "0")
    assert _fused.compiled_enabled()  # set_compiled overrides the environment


def _check_layer_output(batches=(3, 5)) -> None:
    m = _layer((2, 4, 8, dict(kernel_size=3, padding=1, groups=4)), "rms")  # multiplier 2, a bias, an offset
    for n in batches:
        x = torch.randn(n, 4, 16, 16, dtype=torch.float64)
        with torch.inference_mode():
            out = m(x)
        assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10


def test_layer_runs_the_kernel_through_dynamo_with_a_symbolic_batch():
    """The layer in eval mode with autograd off calls the compiled function (here dynamo with a recording
    backend instead of inductor: no C++ compile in the fast suite) and gives the plain formula's output; two
    batch sizes make one graph, with a symbolic batch."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    _fused.set_compiled(True)
    _fused._STATE["fn"] = torch.compile(_fused.depthwise_taps, backend=backend)
    _check_layer_output()
    assert len(graphs) == 1


@pytest.mark.slow
def test_inductor_compiled_layer_gives_the_reference_output():
    """The real thing: inductor's C++ kernel (a compile of 5-20 s), float64, the post term, two batch sizes."""
    _fused.set_compiled(True)
    _fused._STATE["fn"] = None
    _check_layer_output()
    assert _fused.compiled_enabled() and _fused._STATE["fn"] is not None  # compiled, no fallback


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    _fused.set_compiled(True)

    def broken(*a):
        raise RuntimeError("no C++ compiler\nmore detail")

    _fused._STATE["fn"] = broken
    m = _layer((2, 4, 4, dict(kernel_size=3, padding=1, groups=4)), "corrected")
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="compiled PatchNorm kernel failed .RuntimeError: no C.. compiler."):
        with torch.inference_mode():
            out = m(x)
    assert not _fused.compiled_enabled()
    assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10


def test_torch_compile_of_the_model_traces_the_tap_expression_in_one_graph():
    """``torch.compile(model, fullgraph=True)`` (dynamo with the eager backend: no C++ compile here) traces
    the layer's tap expression on the inference path, with no graph break, and gives the reference's output;
    the opaque pad's fake implementation agrees with the real one (``opcheck``)."""
    torch._dynamo.reset()
    m = _layer((2, 4, 8, dict(kernel_size=3, padding=1, groups=4)), "l2")  # multiplier 2, the post term
    x = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    seen = []

    def backend(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    with torch.inference_mode():
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
    assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10
    assert len(seen) == 1 and torch.ops.normswap.patchnorm_pad.default in seen[0]
    assert not any("conv" in str(t) for t in seen[0])  # the taps, not the chunked path's convs
    torch.library.opcheck(_fused.opaque_pad, (torch.randn(2, 3, 5, 6), [1, 2, 0, 3]))
