"""Helpers of :mod:`normswap.variants.patchnorm`: the patch-norm kernels (below), the streaming
least squares of calibration, BatchNorm folding, and the variant's example models.

For a convolution with ``groups = G``, output location ``q`` of group ``j`` reads the patch ``P_jq``
(the group's ``C_in / G`` input channels times every kernel tap, with the conv's stride, padding and
dilation). PatchNorm needs ``n2[n, j, q] = sum over P_jq of x^2`` (docs/methods.md section 1.3.1). Since
``sum_{c, tap} x[c, tap]^2 = sum_tap (sum_c x[c, tap]^2)``, the efficient computation is:

1. ``q = sum of x^2 over the channels of each group``, shape ``(N, G, *spatial)`` (the whole work
   on the input: one pass, ``C_in / G`` times smaller output);
2. a box filter of ``q`` with the conv's kernel size, stride, padding and dilation, one channel per
   group: a (depthwise) all-ones-kernel convolution (``method="conv"``, the default ``"auto"``), or
   average pooling with ``divisor_override=1`` (an exact sum, ``count_include_pad``; ``"box"``,
   dilation 1 only). On CPU (batch 8, 2 threads) the ones-kernel conv measured faster: 1.4x for
   one channel at 56x56 and 224x224, 2-5x for 8-64 channels; pooling won only on small maps
   (one channel at 28x28), where both take under 0.2 ms. A separable box sum (``k - 1`` adds of shifted
   slices per spatial dim) measured slower still on the depthwise layer of docs/patchnorm.md (1.9-2.0x
   Conv+BN against 1.66x with the ones-kernel conv, both on the inference path's chunks, 2 threads).

``"direct"`` is the literal statement of docs/methods.md section 1.3.1 (a conv of ``x^2`` with an all-ones kernel of
shape ``(G, C_in / G, *k)``), kept as a cross-check. A 1x1 unpadded kernel needs no filter at all:
``n2`` is ``q`` at the strided locations. padding_mode other than ``zeros`` is honoured by padding
``x`` explicitly first, exactly as ``nn.Conv`` does.

``_reference_*`` are the straightforward im2col (unfold) versions, used only by the tests and the
benchmark as an independent oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from normswap.core.kinds import qualname

__all__ = ["ConvGeometry", "patch_sq_norm", "scale_by_group"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
METHODS = ("auto", "box", "conv", "direct")
# the channel sum of a groups=1 conv as an addcmul chain (autograd off): up to this many channels, per-channel
# slices of at least this many elements (below, the per-call overhead of the chain outweighs the saved pass)
CHAIN_MAX_CHANNELS = 1024
CHAIN_MIN_SLICE = 1 << 14


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a ConvNd that decides which input elements feed which output location."""

    dims: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str  # as the conv holds it: a tuple of ints, "same" or "valid"
    padding_mode: str
    pads: tuple[tuple[int, int], ...]  # (before, after) per spatial dim, what the conv's own padding amounts to
    # zero padding applied to the raw input before the conv's own: ``"same"`` = TF-style "same" computed from
    # each input's size (timm ``Conv2dSame``), a tuple = fixed pads (a static same-padding conv's ZeroPad2d)
    pre_pads: tuple[tuple[int, int], ...] | str | None = None

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, kind: str | None = None) -> "ConvGeometry":
        """The geometry of ``conv`` as PatchNorm's adapter ``kind`` reads it (``None``: the registered kind of
        its class, ``"conv"`` for an unregistered one): ``conv`` (its own padding only), ``conv_same`` (TF "same"
        from the input size, then no padding of its own) or ``conv_static_same`` (its ``static_padding``
        module, nn.ZeroPad or nn.Identity, then its own padding)."""
        if kind is None:
            from normswap.variants.patchnorm.adapters import ADAPTERS

            kind = ADAPTERS.get(qualname(conv), "conv")
        dims = len(conv.kernel_size)
        pre = _pre_pads(conv, kind, dims)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pads = tuple((0, 0) for _ in range(dims))
            else:  # "same": as nn.Conv computes it (the odd extra element goes after)
                totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = tuple((int(p), int(p)) for p in conv.padding)
        return cls(
            dims=dims, in_channels=int(conv.in_channels), out_channels=int(conv.out_channels),
            groups=int(conv.groups), kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
            dilation=tuple(conv.dilation),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            padding_mode=str(conv.padding_mode), pads=pads, pre_pads=pre,
        )

    @property
    def patch_size(self) -> int:
        """``|P|``: elements in one patch (padding included)."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def fpad(self) -> list[int]:
        """The pads in ``F.pad`` order (last dim first)."""
        return _fpad(self.pads)

    def pre_pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the zero padding a same-padding conv applies before its own (``x`` itself for a plain conv)."""
        if self.pre_pads is None:
            return x
        if self.pre_pads == "same":
            return same_pad(x, self.kernel_size, self.stride, self.dilation)
        return F.pad(x, _fpad(self.pre_pads))

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | str]:
        """``(input, padding)`` for the conv call: a same-padding conv's zero padding and non-zeros padding
        modes pad ``x`` here, as the source conv does."""
        x = self.pre_pad(x)
        if self.padding_mode != "zeros":
            return F.pad(x, self.fpad, mode=self.padding_mode), (0,) * self.dims
        return x, self.padding

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             padding: tuple[int, ...] | str) -> torch.Tensor:
        """The source conv's own call on a prepared input (bit-identical to ``nn.ConvNd.forward``)."""
        return _CONV[self.dims](x, weight, bias, self.stride, padding, self.dilation, self.groups)


def _pre_pads(conv: nn.modules.conv._ConvNd, kind: str, dims: int) -> tuple[tuple[int, int], ...] | str | None:
    """:attr:`ConvGeometry.pre_pads` of a conv of adapter ``kind`` (ValueError when it does not fit the kind)."""
    if kind == "conv":
        return None
    if kind not in ("conv_same", "conv_static_same"):
        raise ValueError(f"unknown convolution adapter kind {kind!r}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"a {kind} convolution pads with zeros; {type(conv).__name__} has padding_mode={conv.padding_mode!r}")
    if kind == "conv_same":
        if isinstance(conv.padding, str) or any(conv.padding):
            raise ValueError(f"a conv_same convolution has no padding of its own; {type(conv).__name__} has "
                             f"padding={conv.padding!r}")
        return "same"
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.Identity):
        return None
    ok = isinstance(pad, (nn.modules.padding._ConstantPadNd)) and float(pad.value) == 0.0
    if not ok or len(pad.padding) != 2 * dims:
        raise ValueError(f"a conv_static_same convolution has a 'static_padding' nn.ZeroPad{dims}d or nn.Identity; "
                         f"{type(conv).__name__} has {type(pad).__name__}")
    flat = [int(p) for p in pad.padding]  # F.pad order: last dim first
    return tuple((flat[2 * i], flat[2 * i + 1]) for i in reversed(range(dims)))


@torch.fx.wrap
def same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
             dilation: tuple[int, ...]) -> torch.Tensor:
    """TF-style "same" zero padding of ``x`` for its own spatial size, as timm's ``pad_same`` computes it: total
    ``max((ceil(i / s) - 1) s + (k - 1) d + 1 - i, 0)`` per dim, the odd element after.

    Wrapped for torch.fx (one call node): the sizes are Python ints here, never tracing proxies."""
    pads = []
    for i, k, s, d in zip(x.shape[-len(kernel):], kernel, stride, dilation):
        total = max((-(-int(i) // s) - 1) * s + (k - 1) * d + 1 - int(i), 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, _fpad(tuple(pads)))


@torch.fx.wrap
def to_acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype sums of squares are taken in: float32 for half inputs, else its own.

    Wrapped for torch.fx (one call node): a dtype test cannot run on a tracing proxy."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def patch_sq_norm(x: torch.Tensor, geom: ConvGeometry, method: str = "auto") -> torch.Tensor:
    """``n2``, shape ``(N, G, *out_spatial)``: the squared norm of every patch (raw input ``x``)."""
    return prepared_sq_norm(geom.prepare(x)[0], geom, method)


def prepared_sq_norm(x_in: torch.Tensor, geom: ConvGeometry, method: str = "auto",
                     affine: tuple[float, float] | None = None) -> torch.Tensor:
    """``n2`` from an input already prepared by :meth:`ConvGeometry.prepare` (avoids padding twice).

    Half-precision inputs are summed in float32 (the result is float32). ``affine = (a, b)`` returns
    ``a n2 + b`` instead, folded into the box filter's kernel and bias where there is one (no extra pass)."""
    if affine is None:
        return _sq_norm(x_in, geom, method)
    if method in ("auto", "conv") and not (all(k == 1 for k in geom.kernel_size) and not any(map(any, geom.pads))):
        return _sq_norm(x_in, geom, method, affine)
    return affine_(_sq_norm(x_in, geom, method), *affine)


def affine_(t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``t`` replaced by ``a t + b`` in place (no pass for ``a = 1`` or ``b = 0``)."""
    if a != 1.0:
        t.mul_(a)
    return t.add_(b) if b != 0.0 else t


def _sq_norm(x_in: torch.Tensor, geom: ConvGeometry, method: str = "auto",
             affine: tuple[float, float] | None = None) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown patch-norm method {method!r}; use one of {', '.join(METHODS)}")
    # zero padding still to apply (non-zeros modes were padded by prepare)
    pads = geom.pads if geom.padding_mode == "zeros" else tuple((0, 0) for _ in range(geom.dims))
    G, cg = geom.groups, geom.in_channels // geom.groups
    xs = to_acc(x_in)
    if method == "direct":
        ones = xs.new_ones((G, cg, *geom.kernel_size))
        return _ones_conv(xs.square(), ones, geom, pads)
    if method == "auto" and all(k == 1 for k in geom.kernel_size) and not any(map(any, pads)):
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in geom.stride)
        return _group_sq_sum(xs[index], G, cg)  # 1x1 unpadded: no filter, just the strided pixels
    q = _group_sq_sum(xs, G, cg)
    if method == "box":
        if any(d != 1 for d in geom.dilation):
            raise ValueError("the box-filter patch norm needs dilation 1; use method='conv'")
        return _box_sum(q, geom.kernel_size, geom.stride, pads)
    # "conv" and "auto": a ones-kernel conv, measured faster than pooling
    if affine is None:
        return _ones_conv(q, q.new_ones((G, 1, *geom.kernel_size)), geom, pads)
    return _ones_conv(q, q.new_full((G, 1, *geom.kernel_size), affine[0]), geom, pads, q.new_full((G,), affine[1]))


def _fpad(pads: tuple[tuple[int, int], ...]) -> list[int]:
    return [p for pair in reversed(pads) for p in pair]


def _ones_conv(q: torch.Tensor, ones: torch.Tensor, geom: ConvGeometry,
               pads: tuple[tuple[int, int], ...], bias: torch.Tensor | None = None) -> torch.Tensor:
    if any(a != b for a, b in pads):  # asymmetric ("same" with an even kernel): pad the small tensor
        q, pads = F.pad(q, _fpad(pads)), tuple((0, 0) for _ in pads)
    return _CONV[geom.dims](q, ones, bias, geom.stride, [a for a, _ in pads], geom.dilation, geom.groups)


def _group_sq_sum(x: torch.Tensor, groups: int, cg: int) -> torch.Tensor:
    """Sum of ``x^2`` over the channels of each group: ``(N, C, *S) -> (N, G, *S)``."""
    if cg == 1:
        return x.square()
    if groups == 1:
        if (not torch.is_grad_enabled() and not is_fx_symbolic_tracing() and cg <= CHAIN_MAX_CHANNELS
                and x[:, 0].numel() >= CHAIN_MIN_SLICE):  # (a proxy's numel cannot be compared: fx traces vecdot)
            # one addcmul per channel into a slice-sized sum that stays in the cache: a single read of x
            # (vecdot multiplies into a full-size temporary, then reduces it: 2-3x slower on large maps)
            acc = x[:, :1].square()
            for c in range(1, cg):
                acc.addcmul_(x[:, c:c + 1], x[:, c:c + 1])
            return acc
        return torch.linalg.vecdot(x, x, dim=1).unsqueeze(1)  # no full-size x^2 temporary
    x = x.unflatten(1, (groups, cg))
    return torch.linalg.vecdot(x, x, dim=2)


def _box_sum(q: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
             pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Sum of ``q`` over every zero-padded window (average pooling with divisor 1: an exact sum)."""
    if len(kernel) == 1:  # avg_pool1d has no divisor_override: pool a 1 x L image instead
        out = _box_sum(q.unsqueeze(-2), (1, *kernel), (1, *stride), ((0, 0), *pads))
        return out.squeeze(-2)
    symmetric = all(a == b and 2 * a <= k for (a, b), k in zip(pads, kernel))
    if not symmetric:  # asymmetric ("same" with an even kernel) or wider than pooling allows
        q = F.pad(q, _fpad(pads))
        pads = tuple((0, 0) for _ in kernel)
    return _POOL[len(kernel)](q, kernel, stride, [a for a, _ in pads], ceil_mode=False,
                              count_include_pad=True, divisor_override=1)


def scale_by_group(v: torch.Tensor, m: torch.Tensor, groups: int, inplace: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``v[n, c, q] * m[n, group(c), q]``: one broadcast multiply of the conv output by the per-patch factor
    (in place, into ``out`` (a tensor of ``v``'s shape), or a new tensor)."""
    if groups == 1:
        return v.mul_(m) if inplace else torch.mul(v, m, out=out) if out is not None else v * m
    vg, mg = v.unflatten(1, (groups, -1)), m.unsqueeze(2)
    if out is not None:
        torch.mul(vg, mg, out=out.unflatten(1, (groups, -1)))
        return out
    return (vg.mul_(mg) if inplace else vg * mg).flatten(1, 2)


# ---- the straightforward im2col references (tests and benchmark only) ---------------------------------
def _reference_patches(x: torch.Tensor, geom: ConvGeometry) -> tuple[torch.Tensor, tuple[int, ...]]:
    """im2col: ``(N, G, C_in/G * prod(k), L)`` patches and the output spatial shape (padding explicit)."""
    x = F.pad(geom.pre_pad(x), geom.fpad, mode="constant" if geom.padding_mode == "zeros" else geom.padding_mode)
    for i, (k, s, d) in enumerate(zip(geom.kernel_size, geom.stride, geom.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    n, g, dims = x.shape[0], geom.groups, geom.dims
    out = x.shape[2:2 + dims]
    x = x.unflatten(1, (g, -1))  # (N, G, Cg, *out, *k)
    perm = [0, 1, 2, *range(3 + dims, 3 + 2 * dims), *range(3, 3 + dims)]
    return x.permute(perm).reshape(n, g, -1, math.prod(out)), tuple(out)


def _reference_n2(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``n2`` from explicit patches: ``(N, G, *out)``."""
    cols, out = _reference_patches(x, geom)
    return cols.square().sum(2).reshape(x.shape[0], geom.groups, *out)


def _reference_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A PatchNormConv's output computed from explicit patches, straight from the formulas."""
    geom = module.geom
    cols, out = _reference_patches(x, geom)
    n, g = x.shape[0], geom.groups
    w = module.weight.reshape(g, geom.out_channels // g, -1)
    v = torch.einsum("gok,ngkl->ngol", w, cols).reshape(n, geom.out_channels, -1)  # W . P
    n2 = cols.square().sum(2).repeat_interleave(geom.out_channels // g, dim=1)  # (N, C_out, L)
    lam = float(module.lam)
    r = 1.0 if module.form == "l2" else math.sqrt(geom.patch_size)
    m = module.n2_mean.to(v.dtype).repeat_interleave(geom.out_channels // g).view(-1, 1)  # the running mean
    if module.form == "corrected":
        k = torch.sqrt(lam * m + 1)
    else:
        k = torch.where(m > 0, 1 / ((1 - lam) + lam * r / torch.sqrt(m + module.eps)), torch.ones_like(m))
    a = (module.gain * lam + (1 - lam)).view(-1, 1) * k
    b = module.bias.view(-1, 1) if module.bias is not None else torch.zeros_like(a)
    off = lam * module.offset.view(-1, 1) if module.offset is not None else 0.0
    if module.form == "corrected":
        z = a * (v + b) / torch.sqrt(lam * n2 + 1) + off
    else:
        z = a * v * ((1 - lam) + lam * r / torch.sqrt(n2 + module.eps)) + b + off
    return z.reshape(n, geom.out_channels, *out)


# ---- BatchNorm folding and the variant's example models ---------------------------------------------
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of an affine map followed by ``bn`` in eval mode (computed in float64)."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias.double() if bias is not None else torch.zeros_like(std)
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), (beta + (b - bn.running_mean.double()) * scale).to(weight.dtype)
