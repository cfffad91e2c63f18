"""PatchNorm's native inference kernels (C++ in ``normswap/native/csrc/patchnorm_*.cpp``, docs/native.md,
"PatchNorm"): what runs them, and on which layers.

- **depthwise** (one input channel per group, any channel multiplier): ``patchnorm_depthwise`` computes the
  conv taps and the patch norm ``n2`` of every output location from the same loads, then the factor, the
  multiply and the ``post`` term: one pass over the input, one write of the output, in place of the eager
  path's two depthwise convolutions and three elementwise passes.
- **dense** (``groups == 1``): the conv stays torch's; ``patchnorm_scale_`` then reads the input once for its
  channel sum of squares (box-filtered over the conv's window where the kernel is wider than one pixel or
  strided) and scales the conv output in place, ``post`` included: one pass over each.
- **patch norms alone** (:func:`sq_norm`, what calibration accumulates): ``patchnorm_sq_norm``, the same window
  sums without the conv and the factor; and calibration's plain depthwise conv (:func:`conv`): the depthwise
  loop with a unit factor.

Both take 2-D convs with zero padding applied at the borders (other padding modes and a same-padding conv's
pre-padding arrive already padded by :meth:`ConvGeometry.prepare`), contiguous NCHW float32 / float64 inputs of
the weight's dtype. Everything else (1-D and 3-D convs, grouped convs with several channels per group,
``channels_last`` or half-precision inputs, empty batches) runs the eager path of
:mod:`normswap.variants.patchnorm.fast`, as does every call under ``torch.fx`` tracing or ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from normswap.native import ops
from normswap.variants.patchnorm.fused import coefficients
from normswap.variants.patchnorm.layer import ConvGeometry

__all__ = ["conv", "kind", "run", "sq_norm"]


def kind(geom: ConvGeometry, x_in: torch.Tensor, w: torch.Tensor) -> str | None:
    """``"depthwise"``, ``"dense"`` or None (the eager path): which native kernel runs this layer on the
    prepared input ``x_in`` with the gain-scaled weight ``w`` (module docstring)."""
    if geom.dims != 2 or not (geom.groups == geom.in_channels or geom.groups == 1):
        return None
    if x_in.dtype not in (torch.float32, torch.float64) or w.dtype != x_in.dtype or x_in.device.type != "cpu":
        return None
    if not x_in.is_contiguous() or x_in.numel() == 0:
        return None
    return "depthwise" if geom.groups == geom.in_channels else "dense"


def _window(geom: ConvGeometry, x_in: torch.Tensor) -> tuple[list[int], list[int]]:
    """``(pads before, output size)`` of the conv on the prepared input: zero padding still to apply."""
    own = geom.pads if geom.padding_mode == "zeros" else tuple((0, 0) for _ in geom.pads)
    out = [(x_in.shape[2 + i] + a + b - d * (k - 1) - 1) // s + 1
           for i, ((a, b), k, s, d) in enumerate(zip(own, geom.kernel_size, geom.stride, geom.dilation))]
    return [a for a, _ in own], out


def _plan(geom: ConvGeometry, x_in: torch.Tensor, w: torch.Tensor) -> tuple[Any, str, list[int], list[int]] | None:
    """``(torch.ops.normswap_native, kind, pads before, output size)``, or None where the eager path runs
    (module docstring; also an empty output)."""
    if torch.compiler.is_compiling() or is_fx_symbolic_tracing():
        return None
    which = kind(geom, x_in, w)
    if which is None:
        return None
    pads, out = _window(geom, x_in)
    lib = ops() if min(out) > 0 else None
    return None if lib is None else (lib, which, pads, out)


def sq_norm(x_in: torch.Tensor, geom: ConvGeometry) -> torch.Tensor | None:
    """``n2`` ``(N, G, *out)`` of a prepared input from the native kernel, or None (the eager path)."""
    plan = _plan(geom, x_in, x_in)
    if plan is None:
        return None
    lib, which, pads, out = plan
    return lib.patchnorm_sq_norm(x_in, list(geom.kernel_size), list(geom.stride), pads, list(geom.dilation), out,
                                 which == "depthwise")


def conv(geom: ConvGeometry, x_in: torch.Tensor, padding: tuple[int, ...] | str, w: torch.Tensor,
         b: torch.Tensor | None) -> torch.Tensor:
    """The plain conv ``w * x_in + b`` of a prepared input with autograd off: the native depthwise loop with the
    factor 1 (``c = (0, 1, 1, 0)``) where it takes the layer (faster than torch's NCHW depthwise conv), else
    torch's conv."""
    plan = _plan(geom, x_in, w) if not torch.is_grad_enabled() else None
    if plan is None or plan[1] != "depthwise":
        return geom.conv(x_in, w, b, padding)
    return _depthwise(plan, geom, x_in, w, b, None, [0.0, 1.0, 1.0, 0.0])


def _depthwise(plan: tuple[Any, str, list[int], list[int]], geom: ConvGeometry, x_in: torch.Tensor,
               w: torch.Tensor, b: torch.Tensor | None, post: torch.Tensor | None, coef: list[float]) -> torch.Tensor:
    lib, _, pads, out = plan
    bias = b.to(x_in.dtype).contiguous() if b is not None else None
    return lib.patchnorm_depthwise(x_in, w.contiguous(), bias, post, list(geom.stride), pads, list(geom.dilation),
                                   out, coef)


def run(module: Any, x_in: torch.Tensor, padding: tuple[int, ...] | str, w: torch.Tensor, b: torch.Tensor | None,
        post: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's output (``post`` included) from its native kernel, or None where none applies (the library
    off or unavailable, a geometry or input :func:`kind` leaves to the eager path, tracing)."""
    geom = module.geom
    plan = _plan(geom, x_in, w)
    if plan is None:
        return None
    lib, which, pads, out = plan
    coef = list(coefficients(module.form, module._s, module.eps, module._r))
    flat = post.reshape(-1).to(x_in.dtype).contiguous() if post is not None else None
    if which == "depthwise":
        return _depthwise(plan, geom, x_in, w, b, flat, coef)
    v = geom.conv(x_in, w, b, padding)
    if not v.is_contiguous():
        v = v.contiguous()
    return lib.patchnorm_scale_(v, x_in, list(geom.kernel_size), list(geom.stride), pads, list(geom.dilation),
                                coef, flat)
