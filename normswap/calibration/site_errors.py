"""Per-site errors of the fidelity report (:func:`normswap.calibration.report.measure`): each converted site's
squared difference from the reference's recorded output at its compare point, and the reference's squared norm,
summed over the samples (the report's relative error is the square root of their ratio).

The sums are float64 from the native kernel where it applies (one read of each tensor, no difference written;
normswap/native/csrc/calib_sums.cpp), else torch's float32 norms of the difference, written to a reused buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normswap.native import ops as native_ops

__all__ = ["add_reference_norms", "has_module", "site_hooks"]


def has_module(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has a submodule ``name``."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:  # e.g. an anact_fn_* module that only the rewritten graph has
        return False


def _ref_norm2(store: dict[str, torch.Tensor], ref2: dict[str, float], a: str) -> float:
    if a not in ref2:
        ref2[a] = float(torch.linalg.vector_norm(store[a].float())) ** 2
    return ref2[a]


def add_reference_norms(model: nn.Module, points: dict[str, list[tuple[str, str]]], store: dict[str, torch.Tensor],
                         sums: dict[str, list[float]], ref2: dict[str, float]) -> None:
    """What :func:`site_hooks` adds for a model whose outputs are the reference's: no error, the norms."""
    for site, pts in points.items():
        for a, b in pts:
            if torch.is_tensor(store.get(a)) and has_module(model, b):
                sums[site][1] += _ref_norm2(store, ref2, a)


def site_hooks(model: nn.Module, points: dict[str, list[tuple[str, str]]], store: dict[str, torch.Tensor],
                sums: dict[str, list[float]], ref2: dict[str, float], work: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks adding each site's squared error against the stored reference outputs (nothing else kept; the
    reference's norms are computed once per slice in ``ref2``, the difference goes to a reused buffer)."""
    by_conv: dict[str, list[tuple[str, str]]] = {}
    for site, pts in points.items():
        for a, b in pts:
            by_conv.setdefault(b, []).append((site, a))

    def fn(name: str, out: Any) -> None:
        for site, a in by_conv.get(name, []):
            ref = store.get(a)
            if torch.is_tensor(out) and ref is not None and ref.shape == out.shape:
                both = _native_diff(out, ref)
                if both is not None:  # one read of each, no difference written
                    sums[site][0] += both[0]
                    sums[site][1] += ref2.setdefault(a, both[1])
                    continue
                if out.dtype == ref.dtype == torch.float32:
                    buf = work.get("diff")
                    if buf is None or buf.numel() < out.numel() or buf.device != out.device:
                        buf = work["diff"] = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
                    diff = torch.sub(out, ref, out=buf[:out.numel()].view(out.shape))
                else:
                    diff = out.float() - ref.float()
                sums[site][0] += float(torch.linalg.vector_norm(diff)) ** 2
                sums[site][1] += _ref_norm2(store, ref2, a)
    return [model.get_submodule(name).register_forward_hook(lambda _m, _a, out, name=name: fn(name, out))
            for name in by_conv if has_module(model, name)]


def _native_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float] | None:
    """``(sum (out - ref)^2, sum ref^2)`` from the native kernel (normswap/native/csrc/calib_sums.cpp: one read of
    each tensor, float64 sums of the values converted exactly, the same at any thread count), or None where it does
    not apply (off or unbuilt, another device or dtype, strided tensors)."""
    if out.device.type != "cpu" or out.dtype != ref.dtype or out.dtype not in (torch.float32, torch.float64) \
            or not (out.is_contiguous() and ref.is_contiguous()) or torch.compiler.is_compiling():
        return None
    o = native_ops()
    if o is None:
        return None
    err, norm = o.diff_sums(out, ref).tolist()
    return err, norm

