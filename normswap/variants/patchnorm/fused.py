"""A depthwise PatchNorm conv as one loop over its input: the opt-in compiled inference kernel.

A depthwise conv (one input channel per group) and its patch norms read the same taps: output location ``q`` of
channel ``c`` is ``sum_tap w[c, tap] x[c, q + tap]`` and its patch norm is ``n2 = sum_tap x[c, q + tap]^2``
(docs/methods.md section 1.3.1). :func:`depthwise_taps` writes the layer as that sum over the kernel's taps of
shifted views of the zero-padded input, followed by the factor and the multiply::

    y = (sum_tap w_tap t_tap + b') * (rsqrt(n2 * c0 + c1) * c2 + c3) + post,   n2 = sum_tap t_tap^2

with ``(c0, c1, c2, c3) = (lam, 1, 1, 0)`` in the corrected form and ``(1, eps, lam r, 1 - lam)`` in the
normaliser forms (:func:`coefficients`). Eagerly that is many passes; under ``torch.compile`` inductor turns it
into a single vectorised loop that reads each input value from the cache ``k^2`` times and writes the output
once, which replaces the conv, the squares, the box-filter conv, the rsqrt and the multiply of the eager path
(five passes, two of them depthwise convolutions). The input is padded before the compiled call: a pad inside
the graph compiles to masked loads, which measured 2.3x slower than the pad plus the unmasked loop.

Opt-in, with the switch UAN's compiled kernel uses: the environment variable ``NORMSWAP_COMPILE=1`` (or
:func:`set_compiled` ``(True)``). It needs a C++ compiler at run time and a compile per layer shape (seconds;
docs/patchnorm.md, "Speed"), which is why it is not the default. A compile failure warns once and turns the
kernel off for the process: the layer then runs the eager path. It runs on the inference path only (eval mode,
autograd off); the expression itself is differentiable and its gradients equal the plain formula's
(tests/test_patchnorm_fused.py). Where normswap's native kernels are on (the default once built), they run these
layers instead (:mod:`normswap.variants.patchnorm.native_path`, faster at every stride): the compiled kernel
then serves only with ``NORMSWAP_NATIVE=0`` or without a library.

Under ``torch.compile(model)`` the same layers trace the expression (:func:`traced`) instead of the chunked
eager path, whatever the switch says, with the pad as an operator the compiler keeps as a real buffer
(:func:`opaque_pad`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from normswap.variants.compiled import requested
from normswap.variants.patchnorm.layer import ConvGeometry, _fpad

__all__ = ["coefficients", "compiled_enabled", "depthwise_taps", "opaque_pad", "phases", "run", "set_compiled",
           "supports", "traced"]

_STATE: dict[str, Any] = {"enabled": None, "fn": None}
# one compiled graph per layer shape (channels, spatial size, kernel, stride, dilation, dtype; the batch is
# symbolic, symbolic spatial sizes failed to compile in torch 2.13): a MobileNetV2 has 13 stride-1 depthwise
# layers of 6 shapes, and a model may have more than dynamo's default limit of 8 per function
RECOMPILE_LIMIT = 256
MIN_MAP = 256  # spatial values per channel below which the eager path is as fast (:func:`supports`)


def set_compiled(enabled: bool) -> None:
    """Turn the compiled depthwise kernel on or off for this process (overrides ``NORMSWAP_COMPILE``)."""
    _STATE["enabled"] = bool(enabled)


def compiled_enabled() -> bool:
    """Whether eval-mode depthwise PatchNorm convs run the compiled kernel (``NORMSWAP_COMPILE=1`` or
    :func:`set_compiled`)."""
    if _STATE["enabled"] is None:
        _STATE["enabled"] = requested()
    return bool(_STATE["enabled"])


def supports(geom: ConvGeometry, x: torch.Tensor) -> bool:
    """Whether the compiled kernel runs this layer: one input channel per group (any multiplier, 1-3 spatial
    dims), stride 1, a map of at least :data:`MIN_MAP` values per channel and a float32 / float64 input (half
    inputs keep the eager path, which sums in float32). Measured on MobileNetV2's depthwise layers (batch 8 at
    160 px, one thread, interleaved with the eager path): stride 1 0.52-0.66x the time on 20x20 to 80x80 maps,
    0.8-1.0x on 10x10 ones (5x5: call overhead, noisy); stride 2 0.75-1.14x with :func:`phases` (1.15-1.66x
    gathering strided taps): the phase split's copy costs what the loop saves on the largest map, so stride 2
    stays eager."""
    if geom.groups != geom.in_channels or any(s != 1 for s in geom.stride):
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    return math.prod(x.shape[2:]) >= MIN_MAP


def coefficients(form: str, lam: float, eps: float, r: float) -> tuple[float, float, float, float]:
    """``(c0, c1, c2, c3)`` of the factor ``rsqrt(n2 c0 + c1) c2 + c3`` (module docstring)."""
    if form == "corrected":
        return (lam, 1.0, 1.0, 0.0)
    return (1.0, eps, lam * r, 1.0 - lam)


def depthwise_taps(planes: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, coef: torch.Tensor,
                   stride: tuple[int, ...], dilation: tuple[int, ...], out: tuple[int, ...]) -> torch.Tensor:
    """The layer's output (spatial size ``out``) from the stride phases of its zero-padded input (:func:`phases`:
    ``(*stride, N, C, *S)``), the gain-scaled weight ``w`` ``(C m, 1, *k)``, bias ``b'`` ``(C m,)`` or None and
    ``coef`` ``(4,)`` (:func:`coefficients`), without the ``post`` term. Plain tensor operations:
    differentiable, and one loop once compiled."""
    kernel, dims = tuple(w.shape[2:]), len(stride)
    n, c = planes.shape[dims:dims + 2]
    mult = w.shape[0] // c
    # a channel multiplier m > 1 works on (N, C, m, *S) views; m = 1 keeps 4-D ones (5-D measured 15 % slower)
    per = (1, c, mult) if mult > 1 else (1, c)
    spread = (lambda t: t.unsqueeze(2)) if mult > 1 else (lambda t: t)  # noqa: E731
    wv = w.reshape(*per[1:], *kernel)
    lead = (slice(None),) * (len(per) - 1)
    v = n2 = None
    for tap in itertools.product(*(range(k) for k in kernel)):
        at = [o * d for o, d in zip(tap, dilation)]  # the tap's offset in the padded input: phase, then start
        t = planes[tuple(a % s for a, s in zip(at, stride)) + (slice(None), slice(None))
                   + tuple(slice(a // s, a // s + m) for a, s, m in zip(at, stride, out))]
        wt = wv[lead + tap].reshape(*per, *([1] * dims))
        v = spread(t) * wt if v is None else v + spread(t) * wt
        n2 = t * t if n2 is None else n2 + t * t
    assert v is not None and n2 is not None
    if b is not None:
        v = v + b.reshape(*per, *([1] * dims))
    f = torch.rsqrt(n2 * coef[0] + coef[1]) * coef[2] + coef[3]
    return (v * spread(f)).reshape(n, c * mult, *out)


def phases(x_in: torch.Tensor, geom: ConvGeometry, pad: Callable[[torch.Tensor, list[int]], torch.Tensor] = F.pad
           ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(planes, out)``: a prepared input (:meth:`ConvGeometry.prepare`) with the conv's own zero padding,
    split into its stride phases ``planes[p0, p1, ...] = xp[..., p0::s0, p1::s1, ...]`` (one copy; a view
    of shape ``(1, ..., N, C, *S)`` at stride 1), and the output's spatial size. At stride ``s`` every tap
    then reads a contiguous slice of one phase: vector loads where strided taps would be gathered."""
    own = geom.pads if geom.padding_mode == "zeros" else tuple((0, 0) for _ in geom.pads)  # others: by prepare
    size = [x_in.shape[2 + i] + a + b for i, (a, b) in enumerate(own)]
    out = tuple((p - d * (k - 1) - 1) // s + 1
                for p, d, k, s in zip(size, geom.dilation, geom.kernel_size, geom.stride))
    pads = tuple((a, b + (-p) % s) for (a, b), p, s in zip(own, size, geom.stride))  # whole phases (never read)
    xp = pad(x_in, _fpad(pads)) if any(map(any, pads)) else x_in
    n, c, dims = xp.shape[0], xp.shape[1], geom.dims
    if all(s == 1 for s in geom.stride):
        return xp.reshape((1,) * dims + tuple(xp.shape)), out
    split = [v for p, s in zip(xp.shape[2:], geom.stride) for v in (p // s, s)]
    order = [3 + 2 * i for i in range(dims)] + [0, 1] + [2 + 2 * i for i in range(dims)]
    return xp.reshape(n, c, *split).permute(order).contiguous(), out


@torch.library.custom_op("normswap::patchnorm_pad", mutates_args=())
def opaque_pad(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """``F.pad(x, pads)`` (zeros) as an operator the compiler cannot look into: its output is a real buffer."""
    return F.pad(x, pads)


@opaque_pad.register_fake
def _(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        shape[-1 - i] += pads[2 * i] + pads[2 * i + 1]
    return x.new_empty(shape)


def traced(module: Any, x_in: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:func:`depthwise_taps` on a prepared input as plain operations (without ``post``): what the layer runs
    under ``torch.compile(model)``, where the caller's compiler fuses it. The pad is :func:`opaque_pad`: fused
    into the loop it becomes masked loads (2.2x Conv+BN on the issue's row, against 0.9-1.0x padded first)."""
    planes, out = phases(x_in, module.geom, opaque_pad)
    coef = x_in.new_tensor(coefficients(module.form, module._s, module.eps, module._r))
    return depthwise_taps(planes, w, b, coef, module.geom.stride, module.geom.dilation, out)


def run(module: Any, x_in: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """The compiled kernel's output for a :class:`PatchNormConv` (``post`` not added), or None where it failed
    to compile (warned once; the kernel is then off for the process)."""
    fn = _STATE["fn"]
    if fn is None:
        fn = _STATE["fn"] = torch.compile(depthwise_taps)
    geom = module.geom
    coef = torch.tensor(coefficients(module.form, module._s, module.eps, module._r), dtype=x_in.dtype)
    planes, out = phases(x_in, geom)
    try:
        if x_in.shape[0] > 1:  # any batch size; channels and spatial sizes stay static
            torch._dynamo.mark_dynamic(planes, geom.dims)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, automatic_dynamic_shapes=False):
            return fn(planes, w, b, coef, geom.stride, geom.dilation, out)
    except Exception as e:  # noqa: BLE001  (no compiler, an inductor bug: the eager path is always there)
        set_compiled(False)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        warnings.warn(f"normswap: the compiled PatchNorm kernel failed ({type(e).__name__}: {first}); "
                      "running the eager path", RuntimeWarning, stacklevel=2)
        return None
