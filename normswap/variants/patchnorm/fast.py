"""PatchNorm's inference path: eval mode with autograd off (``torch.no_grad`` / ``torch.inference_mode``).

What the training path recomputes on every call and inference need not (measured in docs/patchnorm.md, "Speed"):

- **frozen terms**: the blended gain times the strength-aware scale ``g k(lam)`` folded into the weight and the
  bias (``W' = g k W``, ``b' = g k b``), plus what is added after the multiply (the normaliser forms' bias, the
  offset). Computed once and cached for the module (:mod:`normswap.variants.cache`), keyed on the identity, storage, version counter, dtype and
  device of every tensor they come from (``weight``, ``bias``, ``gain``, ``offset``, ``lam``, ``n2_mean``) and on
  the strength mirror: any in-place change (an optimiser step, ``load_state_dict``, calibration's ``copy_``),
  a replaced parameter or ``.to()`` gives a new key and the terms are rebuilt. Tensors without a version
  counter (parameters created under ``torch.inference_mode``) are never cached.
- **chunks**: a batch whose samples are large is processed a few samples at a time (about :data:`CHUNK_BYTES`
  of input per chunk): the conv, the patch norms of the chunk and the multiply, written straight into the
  output. The squares, the box filter and the factor of one chunk stay in the cache, and no batch-sized
  temporary is allocated (fresh large buffers cost page faults on every call); peak memory is the output plus
  one chunk's temporaries.

- **native kernels** (the default where the native library is built, :mod:`normswap.native`): 2-D depthwise and
  ``groups = 1`` convs on contiguous float32 / float64 inputs run :mod:`normswap.variants.patchnorm.native_path`
  first (C++ loops; docs/native.md, "PatchNorm"); everything below is their fallback.
- **compiled kernel** (opt-in, ``NORMSWAP_COMPILE=1``): depthwise convs at stride 1 on maps of 256+ values run
  :mod:`normswap.variants.patchnorm.fused` instead (conv, patch norms, factor and multiply in one compiled loop)
  where the native kernels do not run them (measured slower than those: 1.33x Conv+BN against 0.64x).

The result is the plain formula's up to float rounding (tests/test_patchnorm_fast.py compares every geometry
with the unfold reference and the training path).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from normswap.variants.cache import cache_for
from normswap.variants.patchnorm import fused as _fused, layer as _patch, native_path as _native

__all__ = ["CHUNK_BYTES", "chunk_step", "conv_inference", "frozen_terms", "inference_path", "linear_inference",
           "sq_norm"]

CHUNK_BYTES = 2 << 20  # input bytes per chunk: one 144 x 56 x 56 float32 sample is 1.8 MB


def inference_path(module: torch.nn.Module, x: torch.Tensor | None = None) -> bool:
    """True where the cached, chunked (or native) path applies: eval mode and autograd off, and not traced.
    Under ``torch.fx`` symbolic tracing the plain formula is traced (the cache compares tensors by identity,
    which a proxy cannot answer); under ``torch.compile`` only a depthwise conv whose input ``x`` the fusable
    expression takes (:func:`conv_inference`), every other layer tracing its plain formula."""
    if module.training or torch.is_grad_enabled() or is_fx_symbolic_tracing():
        return False
    if torch.compiler.is_compiling():
        geom = getattr(module, "geom", None)
        return x is not None and geom is not None and _fused.supports(geom, x)
    return True


def frozen_terms(module: Any, build: Callable[[], tuple]) -> tuple:
    """``build()``, cached for ``module`` until one of the tensors it reads changes
    (:mod:`normswap.variants.cache`; module docstring)."""
    tensors = (module.weight, module.bias, module.gain, module.offset, module.lam, module.n2_mean)

    def make() -> tuple:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode too
            return build()
    return cache_for(module).get(tensors, (module._s,), make)


def scaled_terms(module: Any, lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(W', b', post)`` of a PatchNorm layer: ``W' = g k W``, ``b' = g k b`` (corrected form), ``post`` what is
    added after the multiply (the normaliser forms' bias plus ``lam o``, shaped ``lead``), or None."""
    g, off = module._blend()
    gk = g * module.scale_per_output(module.lam)
    w = module.weight * gk.view(-1, *([1] * (module.weight.dim() - 1)))
    corrected = module.form == "corrected"
    b = module.bias * gk if corrected and module.bias is not None else None
    post = module.bias if not corrected and module.bias is not None else None
    if off is not None:
        post = off if post is None else post + off
    return w, b, (post.view(lead) if post is not None else None)


def factor(module: Any, n2_affine: Callable[[tuple[float, float]], torch.Tensor]) -> torch.Tensor:
    """The per-patch factor at the module's strength, from ``n2_affine((a, b)) = a n2 + b`` (a new tensor, worked
    on in place): ``1 / sqrt(lam n2 + 1)`` (corrected) or ``lam r / sqrt(n2 + eps) + (1 - lam)``."""
    lam = module._s
    if module.form == "corrected":
        return n2_affine((lam, 1.0)).rsqrt_()
    m = n2_affine((1.0, module.eps)).rsqrt_()
    if lam * module._r != 1.0:
        m.mul_(lam * module._r)
    return m.add_(1.0 - lam) if lam != 1.0 else m


def chunk_step(x_in: torch.Tensor, geom: _patch.ConvGeometry) -> int:
    """Samples per chunk: about :data:`CHUNK_BYTES` of input where the patch norm needs a full-size box filter
    (one channel per group, a kernel wider than 1), else the whole batch (a groups=1 conv's norm is a channel
    sum, one small map, and its conv is faster on the whole batch)."""
    n = x_in.shape[0]
    per = x_in[0].numel() * x_in.element_size() if n else 0
    boxed = geom.in_channels == geom.groups and any(k > 1 for k in geom.kernel_size)
    return max(n, 1) if per == 0 or not boxed else max(1, CHUNK_BYTES // per)  # an empty batch: one empty chunk


def sq_norm(x_in: torch.Tensor, geom: _patch.ConvGeometry) -> torch.Tensor:
    """``n2`` of a prepared input with autograd off (the calibration observer's patch norms): the native kernel
    where it takes the layer, else chunk by chunk where :func:`chunk_step` says so."""
    if not torch.is_grad_enabled():
        n2 = _native.sq_norm(x_in, geom)
        if n2 is not None:
            return n2
    step, n = chunk_step(x_in, geom), x_in.shape[0]
    if step >= n or torch.is_grad_enabled():
        return _patch.prepared_sq_norm(x_in, geom)
    return torch.cat([_patch.prepared_sq_norm(x_in[i:i + step], geom) for i in range(0, n, step)])


def conv_inference(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A :class:`PatchNormConv`'s output at a non-zero strength on the inference path (module docstring)."""
    geom = module.geom
    if torch.compiler.is_compiling() and _fused.supports(geom, x):  # torch.compile(model): the fusable expression
        w, b, post = scaled_terms(module, (-1, *([1] * geom.dims)))
        out = _fused.traced(module, geom.prepare(x)[0], w, b)
        return out if post is None else out + post
    w, b, post = frozen_terms(module, lambda: scaled_terms(module, (-1, *([1] * geom.dims))))
    x_in, padding = geom.prepare(x)
    out = _native.run(module, x_in, padding, w, b, post)  # the native kernels (normswap/native), when built
    if out is not None:
        return out
    if _fused.compiled_enabled() and _fused.supports(geom, x_in):
        out = _fused.run(module, x_in, w, b)  # one compiled loop (opt-in, normswap/variants/patchnorm/fused.py)
        if out is not None:
            return out if post is None else out.add_(post)
    n, step = x_in.shape[0], chunk_step(x_in, geom)
    out = None
    for i in range(0, max(n, 1), step):
        xc = x_in[i:i + step]
        v = geom.conv(xc, w, b, padding)
        m = factor(module, lambda ab: _patch.prepared_sq_norm(xc, geom, affine=ab)).to(v.dtype)
        if step >= n:  # one chunk: in place
            out = _patch.scale_by_group(v, m, geom.groups, inplace=True)
            break
        if out is None:
            out = v.new_empty((n, *v.shape[1:]))
        _patch.scale_by_group(v, m, geom.groups, out=out[i:i + step])
    assert out is not None
    return out if post is None else out.add_(post)


def linear_inference(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A :class:`PatchNormLinear`'s output at a non-zero strength on the inference path."""
    w, b, post = frozen_terms(module, lambda: scaled_terms(module, (-1,)))
    z = torch.nn.functional.linear(x, w, b)
    m = factor(module, lambda ab: _patch.affine_(module._sq_norm(x), *ab))
    z.mul_(m.to(z.dtype))
    return z if post is None else z.add_(post)
