"""Section 2, whole models: converted torchvision models (random init: speed does not depend on the weights)
against the original in eval mode and against the BN-folded original (the floor: what inference could cost
with the normalisation gone); one training step; ANAct after ``normswap export``; peak forward memory.

    python -m benchmarks.models MODEL BATCH SIZE      # (internal) the memory child: prints one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch
from torch import nn

import normswap  # noqa: F401  (before torchvision: the import guard)
from normswap.calibration.runner import run_calibration

from .timing import Bench, peak_rise_mib

HOW = ("Torchvision models, random init, eval mode, `torch.inference_mode`; every configuration of one model "
       "interleaved in the same rounds. `folded` is the original with every Conv->BN folded "
       "(`torch.fx.experimental.optimization.fuse`), the floor for a normalisation layer's cost. UAN (K = 3, "
       "calibrated on the timed batch first: its layers' components coincide until calibration separates them, "
       "and separated ones cost more, docs/speed.md) and PatchNorm at strength 1 (the paper's layer); ANAct as converted (strength 0: folded sites compute "
       "c (f - mu) at every strength, unfolded ones are the plain activation), and after `normswap.export`. "
       "Training step: forward, a logsumexp loss, backward, in training mode. Peak memory: the rise of the "
       "peak resident set (CUDA: allocator peak) over one forward, every configuration in one child process "
       "started with `MALLOC_MMAP_THRESHOLD_=65536` so that freed buffers leave the resident set. `uan compiled`: "
       "the same UAN model with its channel-mode kernel compiled (`NORMSWAP_COMPILE=1`, docs/uan.md; opt-in, "
       "native kernels off, "
       "its compile falls in the warm-up), where the model has BatchNorm sites; `patchnorm compiled`: the PatchNorm "
       "model with its depthwise kernel compiled (the same switch, docs/patchnorm.md; stride-1 depthwise layers on "
       "maps of 256+ values, inference only), where the model has depthwise convolutions. `uan eager` / "
       "`patchnorm eager` (where normswap's native kernels are built, docs/native.md): the same model with them "
       "off (`NORMSWAP_NATIVE=0`), the torch path each layer keeps as its fallback.")
VARIANTS = {"patchnorm": 1.0, "uan": 1.0, "anact": 0.0}


def build(name: str, size: int) -> nn.Module:
    """A torchvision model, random init (seed 0), eval mode; ViTs built for ``size``. ``tiny_resnet`` is a
    ResNet with one BasicBlock per stage (the test suite's stand-in)."""
    import torchvision

    torch.manual_seed(0)
    if name == "tiny_resnet":
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    kw = {"image_size": size} if name.startswith("vit") else {}
    return getattr(torchvision.models, name)(weights=None, **kw).eval()


def configs(name: str, size: int, x: torch.Tensor, *, folded: bool = True) -> tuple[dict[str, nn.Module], list[str]]:
    """Every configuration of ``name``: original, folded, each variant that applies, ANAct exported; and
    the reasons for the ones that do not apply."""
    base = build(name, size).to(x.device)
    out, skipped = {"original": base}, []
    if folded and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules()):
        from torch.fx.experimental.optimization import fuse

        out["folded"] = fuse(build(name, size)).to(x.device).eval()
    for variant, strength in VARIANTS.items():
        try:
            r = normswap.convert(base, to=variant, strength=strength, example_inputs=x[:2],
                                 options={"k": 3} if variant == "uan" else None)
        except normswap.NormswapError as e:
            skipped.append(f"{variant}: {str(e).splitlines()[0][:200]}")
            continue
        if variant == "uan":  # fitted components: an uncalibrated UAN layer's coincide, and cost less than real ones
            run_calibration(r.model, r.plan, x.split(max(1, len(x) // 2)))
        out[variant] = r.model.eval()
        if variant == "anact":
            out["anact exported"] = normswap.export(r, example_inputs=x[:2]).model.eval()
    return out, skipped


class Switched(nn.Module):
    """``model`` run with a switch of normswap's set for its own calls only: ``flip(True)`` before each call and
    ``flip(False)`` after. For a variant's opt-in compiled kernel (``NORMSWAP_COMPILE=1``) ``flip`` is its
    ``set_compiled`` (``normswap.variants.uan.set_compiled`` or ``normswap.variants.patchnorm.fused.set_compiled``;
    the compile falls in the warm-up calls); for the eager torch path, :func:`native_off`."""

    def __init__(self, model: nn.Module, flip: Callable[[bool], None]) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.flip(True)
        try:
            return self.model(x)
        finally:
            self.flip(False)


def native_off(on: bool) -> None:
    """A :class:`Switched` flip that turns normswap's native kernels off (``NORMSWAP_NATIVE=0``) while on, and
    back to the environment's choice after."""
    from normswap import native

    native.set_enabled(False if on else None)


def compiled_only(set_compiled: Callable[[bool], None]) -> Callable[[bool], None]:
    """A :class:`Switched` flip for a variant's opt-in compiled kernel alone: the native kernels, which take
    precedence over it where both apply, are off while it is on."""
    def flip(on: bool) -> None:
        native_off(on)
        set_compiled(on)
    return flip


def native_available() -> bool:
    """Whether the default path runs normswap's native kernels here (built, or buildable, and not switched off)."""
    from normswap import native

    return native.ops() is not None


def with_compiled(models: dict[str, nn.Module], training: bool = False) -> dict[str, nn.Module]:
    """``models`` plus ``uan compiled`` where the UAN model has channel-mode (BatchNorm) sites, and (inference only:
    the PatchNorm kernel serves eval calls) ``patchnorm compiled`` where the PatchNorm model has a depthwise conv
    the kernel takes; and, where the native kernels are on, ``uan eager`` / ``patchnorm eager``: the same models
    with them off, the torch path every layer keeps as its fallback."""
    from normswap.variants.patchnorm import PatchNormConv
    from normswap.variants.patchnorm import fused as pn_fused
    from normswap.variants.uan import UANChannel, set_compiled

    out = dict(models)
    native = native_available()
    uan = models.get("uan")
    if uan is not None and any(isinstance(m, UANChannel) for m in uan.modules()):
        out["uan compiled"] = Switched(uan, compiled_only(set_compiled))
        if native:
            out["uan eager"] = Switched(uan, native_off)
    pn = models.get("patchnorm")
    if not training and pn is not None and any(
            isinstance(m, PatchNormConv) and m.groups == m.in_channels > 1 for m in pn.modules()):
        out["patchnorm compiled"] = Switched(pn, compiled_only(pn_fused.set_compiled))
    if not training and pn is not None and native:
        out["patchnorm eager"] = Switched(pn, native_off)
    return out


def _infer(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return m(x)
    return run


def _train_step(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    m.train()

    def run() -> object:
        m.zero_grad(set_to_none=True)
        m(x).logsumexp(dim=1).sum().backward()
        return None
    return run


def memory(name: str, batch: int, size: int, device: torch.device) -> dict[str, float | None]:
    """Peak-memory rise of one forward of every configuration (in this process)."""
    x = torch.randn(batch, 3, size, size, device=device)
    models, _ = configs(name, size, x)
    return {label: peak_rise_mib(_infer(m, x), device) for label, m in models.items()}


def memory_child(name: str, batch: int, size: int, threads: int) -> dict[str, float | None]:
    """:func:`memory` in a fresh process whose freed buffers leave the resident set."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-m", "benchmarks.models", name, str(batch), str(size)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(bench: Bench) -> dict[str, Any]:
    sz, dev = bench.sizes, bench.device
    rows: list[dict[str, Any]] = []
    notes = []
    reps = int(sz["model_repeats"])
    for name, (batch, size) in sz["models"].items():
        bench.log(f"model {name}")
        x = torch.randn(batch, 3, size, size, device=dev)
        models, skipped = configs(name, size, x)
        notes += [f"{name}: {s}" for s in skipped]
        what = f"{name} batch {batch} at {size} px"
        timed = with_compiled(models) if sz.get("uan_compiled", True) else models
        rows += bench.compare("inference", what, {k: _infer(m, x) for k, m in timed.items()}, "original", reps,
                              also_vs="folded" if "folded" in models else None)
        if dev.type == "cuda" or not sz["memory_child"]:
            mem = memory(name, batch, size, dev)
        else:
            mem = memory_child(name, batch, size, torch.get_num_threads())
        for r in rows:
            if r.get("what") == what and r["group"] == "inference" and mem.get(r["candidate"]) is not None:
                base_mib = mem.get("original") or 0.0
                r.update(peak_mib=mem[r["candidate"]], base_peak_mib=base_mib,
                         memory_ratio=mem[r["candidate"]] / base_mib if base_mib > 0 else None)
        tb, ts = sz["train"]
        xt = torch.randn(tb, 3, ts, ts, device=dev)
        trained, _ = configs(name, ts, xt, folded=False)
        trained.pop("anact exported", None)
        what_t = f"{name} batch {tb} at {ts} px"
        if sz.get("uan_compiled", True):
            trained = with_compiled(trained, training=True)
        rows += bench.compare("training step", what_t, {k: _train_step(m, xt) for k, m in trained.items()},
                              "original", reps)
    return {"title": "2. Whole models", "how": HOW, "kind": "speed", "rows": rows, "notes": notes}


if __name__ == "__main__":
    n, b, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(memory(n, b, s, torch.device("cpu"))))
