"""Section 1, layer speed: each variant layer against the layer it replaces, at ResNet-50, MobileNetV2 and ViT-B
shapes; PatchNorm also against the naive unfold (im2col) computation and, for 1x1 convolutions, against its
memory-traffic floor; ``torch.compile`` where it works.

Every variant layer is made the way users get it, by ``normswap.convert`` of a one-layer model, at strength 1
(the paper's layer; UAN with K = 3)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import normswap

from .models import Switched, compiled_only, native_available, native_off
from .timing import Bench

HOW = ("Each variant layer (made by `normswap.convert` of a one-layer model, strength 1, UAN K = 3) against the "
       "layer it replaces, same input, interleaved rounds; eval rows under `torch.inference_mode`, train rows are "
       "forward + backward of a sum loss in training mode. `unfold` is PatchNorm computed naively from explicit "
       "patches (`F.unfold`); `floor` is the memory-traffic floor of a 1x1 PatchNorm: Conv+BN plus one more read of "
       "the input (`x.sum()`, the cheapest read there is), since PatchNorm must read every input value once more "
       "for its per-pixel norm and can at best fold BN's pass over the output into its own multiply. "
       "`patchnorm compiled` (depthwise rows): the same layer with normswap's opt-in compiled depthwise kernel "
       "(`NORMSWAP_COMPILE=1`, docs/patchnorm.md; native kernels off, since they take precedence; its compile falls "
       "in the warm-up). "
       "`patchnorm eager` / `uan eager` (where normswap's native kernels are built, docs/native.md): the same layer "
       "with them off (`NORMSWAP_NATIVE=0`), the torch path it keeps as its fallback. "
       "`compiled` group: `torch.compile` of each module (default mode), `torch.compile(...)`, against the eager baseline.")


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)


def _convert(model: nn.Module, variant: str, x: torch.Tensor, **kw: Any) -> nn.Module:
    opts = {"k": 3} if variant == "uan" else None
    return normswap.convert(model, to=variant, strength=1.0, options=opts, example_inputs=x[:2], **kw).model


def unfold_patchnorm(pn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """PatchNorm's corrected form at lam = 1 computed from explicit patches (docs/methods.md section 1.3):
    ``gain * (W . P + b) / sqrt(|P|^2 + 1)``; the naive computation the layer is meant to beat."""
    k, g, out = pn.kernel_size, pn.groups, pn.out_channels

    def run(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, k, dilation=pn.dilation, padding=pn.padding, stride=pn.stride)  # (N, C*kk, L)
        cols = cols.view(n, g, -1, cols.shape[-1])
        v = torch.einsum("gok,ngkl->ngol", pn.weight.view(g, out // g, -1), cols).reshape(n, out, -1)
        n2 = cols.square().sum(2).repeat_interleave(out // g, dim=1)
        b = pn.bias.view(1, -1, 1) if pn.bias is not None else 0.0
        z = pn.gain.view(1, -1, 1) * (v + b) * torch.rsqrt(n2 + 1)
        ho = (h + 2 * pn.padding[0] - k[0]) // pn.stride[0] + 1
        return z.view(n, out, ho, -1)
    return run


def traffic_floor(pair: nn.Sequential) -> Callable[[torch.Tensor], torch.Tensor]:
    """The 1x1 floor: Conv+BN plus one more read of the input (a contiguous sum, the cheapest read there is).
    A 1x1 PatchNorm must read every input value once more than Conv+BN (for its per-pixel norm) and may fold
    the BN's pass over the output into its own multiply."""

    def run(x: torch.Tensor) -> torch.Tensor:
        y = pair(x)
        x.sum()
        return y
    return run


def _cases(sz: dict[str, Any]) -> list[tuple[str, str, Callable[[], nn.Module], tuple[int, ...]]]:
    """``(name, variant, baseline factory, input shape)`` for every layer row."""
    d, n, hw = sz["channel_div"], sz["layer_batch"], sz["layer_hw"]
    c = lambda v: max(1, v // d)  # noqa: E731
    tok = (sz["vit_batch"], sz["vit_tokens"])

    def conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            pair = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))
            _randomise_bn(pair[1])
            return pair
        return make

    def bn(ch: int) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            m = nn.Sequential(nn.BatchNorm2d(ch))
            _randomise_bn(m[0])
            return m
        return make

    return [
        ("r50 conv3x3 64->64", "patchnorm", conv_bn(c(64), c(64), 3), (n, c(64), hw, hw)),
        ("r50 conv1x1 256->64", "patchnorm", conv_bn(c(256), c(64), 1), (n, c(256), hw, hw)),
        ("r50 BN 256", "uan", bn(c(256)), (n, c(256), hw, hw)),
        ("r50 ReLU 256", "anact", lambda: nn.Sequential(nn.ReLU()), (n, c(256), hw, hw)),
        ("mnv2 dw3x3 144", "patchnorm", conv_bn(c(144), c(144), 3, c(144)), (n, c(144), hw, hw)),
        ("mnv2 conv1x1 24->144", "patchnorm", conv_bn(c(24), c(144), 1), (n, c(24), hw, hw)),
        ("mnv2 BN 144", "uan", bn(c(144)), (n, c(144), hw, hw)),
        ("mnv2 ReLU6 144", "anact", lambda: nn.Sequential(nn.ReLU6()), (n, c(144), hw, hw)),
        ("vit LayerNorm 768", "uan", lambda: nn.Sequential(nn.LayerNorm(c(768))), (*tok, c(768))),
        ("vit GELU 3072", "anact", lambda: nn.Sequential(nn.GELU()), (*tok, c(3072))),
        ("vit Linear 768->3072", "patchnorm", lambda: nn.Sequential(nn.Linear(c(768), c(3072))), (*tok, c(768))),
    ]


def _infer(m: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return m(x)
    return run


def _train(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).sum().backward()
        return None
    return run


def _compiled(bench: Bench, name: str, module: nn.Module, x: torch.Tensor) -> tuple[Callable | None, str]:
    try:
        fn = torch.compile(module)
        with torch.inference_mode():
            fn(x)
        return fn, ""
    except Exception as e:  # noqa: BLE001  (any compiler failure is a stated skip, not a crash)
        return None, f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def run(bench: Bench) -> dict[str, Any]:
    sz, dev = bench.sizes, bench.device
    rows: list[dict[str, Any]] = []
    reps = int(sz["layer_repeats"])
    for name, variant, make, shape in _cases(sz):
        bench.log(f"layer {name}")
        torch.manual_seed(0)
        x = torch.randn(*shape, device=dev)
        base = make().to(dev).eval()
        kw = {"targets": ["Linear"]} if "Linear" in name else {}
        cand = _convert(base, variant, x, **kw).to(dev).eval()
        label = {"patchnorm": "Conv+BN" if isinstance(base[0], nn.Conv2d) else "Linear", "uan": name.split()[1],
                 "anact": name.split()[1]}[variant]
        what = f"{name} ({tuple(shape)})"
        fns = {label: _infer(base, x), variant: _infer(cand, x)}
        if variant in ("patchnorm", "uan") and native_available():  # the torch path, native kernels off
            fns[f"{variant} eager"] = _infer(Switched(cand, native_off), x)
        if variant == "patchnorm" and isinstance(base[0], nn.Conv2d):
            pn = cand[0]
            if pn.kernel_size == (1, 1):
                fns["floor"] = _infer(traffic_floor(base), x)
            if pn.groups == pn.in_channels > 1:  # the opt-in compiled depthwise kernel (NORMSWAP_COMPILE=1)
                from normswap.variants.patchnorm import fused

                fns["patchnorm compiled"] = _infer(Switched(cand, compiled_only(fused.set_compiled)), x)
        rows += bench.compare("eval", what, fns, label, reps, variant=variant)
        if variant == "patchnorm" and isinstance(base[0], nn.Conv2d) and (pn.kernel_size != (1, 1) or pn.groups == 1):
            # rounds of their own: the naive reference's patch tensors (9x the input) churn the allocator and
            # the cache, and slowed the layers timed in the same rounds by up to 2x
            rows += bench.compare("eval", what, {label: _infer(base, x), "unfold": _infer(unfold_patchnorm(pn), x)},
                                  label, reps, variant=variant)
        if name in sz["compile"]:
            fn, why = _compiled(bench, name, cand, x)
            bfn, bwhy = _compiled(bench, name, base, x)
            if fn is None or bfn is None:
                rows.append(bench.skipped("compiled", what, f"torch.compile({variant})", why or bwhy))
            else:
                fns = {label: _infer(base, x), f"torch.compile({variant})": _infer(fn, x),
                       f"torch.compile({label})": _infer(bfn, x)}
                rows += bench.compare("compiled", what, fns, label, reps, variant=variant)
        xt = x.clone().requires_grad_(True)
        base_t, cand_t = make().to(dev).train(), _convert(make().eval(), variant, x, **kw).to(dev).train()
        fns = {label: _train(base_t, xt), variant: _train(cand_t, xt)}
        if variant == "uan" and native_available():
            fns["uan eager"] = _train(Switched(cand_t, native_off), xt)
        rows += bench.compare("train", what, fns, label, reps, variant=variant)
    return {"title": "1. Layer speed", "how": HOW, "kind": "speed", "rows": rows}
