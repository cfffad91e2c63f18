"""Section 3, the tool itself: conversion (find + apply + verify + save) against ``torch.fx.symbolic_trace``
alone; calibration against plain forwards over the same batches; ``normswap.evaluate`` (what ``normswap eval``
runs) against plain forwards over the same samples."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

import normswap
from normswap.core.threads import serial
from normswap.surgery.probes import is_small
from normswap.variants import set_strengths

from .models import build, native_available, native_off
from .timing import Bench, peak_rise_mib

HOW = ("Public API calls timed whole, interleaved with their baseline. Conversion: `normswap.plan` (find), "
       "`normswap.convert` (find, copy, apply, verify on the probe batch), and convert + `save` to a temporary "
       "file, against `torch.fx.symbolic_trace` of the same model (random init); its `floor` is what a conversion "
       "that proves its exact start cannot avoid: one trace, one copy of every tensor, one forward of the probe (on "
       "one thread where the probe is small, as `convert` runs it: faster there, docs/speed.md \"Seventh pass\"); "
       "`save` and `load` (with the model given) of the converted model, and `floor + save`: that floor plus the "
       "state_dict hashed and written once with fsync (what a checksummed atomic save cannot avoid). By name "
       "(not in the tiny profile): `normswap.convert(NAME, weights=\"none\")`, which builds the model and verifies on the probe "
       "it infers, `load` of its file (rebuilds the architecture), and the build alone for reference. Calibration: "
       "`normswap.calibrate(..., evaluate=False)` on N inputs stored in a `.safetensors` file (batches of 16), "
       "against plain forwards of the original over the same batches: the ratio is time per sample, its inverse "
       "the throughput (UAN and ANAct converted at strength 0, PatchNorm at 1, the strength each is calibrated "
       "at); `calibrate (...) eager`, where normswap's native kernels are built: the same call with them off "
       "(`NORMSWAP_NATIVE=0`). PatchNorm's `floor` is what its network-order calibration cannot avoid: a forward of the original "
       "(the targets) and one of the converted model at strength 1 (each layer's input) per batch. Evaluation: "
       "`normswap.evaluate` (UAN at strength 0.5: the original and the model at 0, 0.5, 1, per-site errors) "
       "against plain forwards of the original over the same samples; its `floor` is the forwards of the rows "
       "it must run (the original and the model at 0.5 and 1: the model at 0 is not run, since every UAN site from "
       "a BatchNorm proves by inspection that it is the original there, `Variant.source_function`), batches of 32; its peak is the rise of this process's peak resident set over one call.")


def _eager(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with normswap's native kernels off for its own call (``NORMSWAP_NATIVE=0``)."""
    def run() -> object:
        native_off(True)
        try:
            return fn()
        finally:
            native_off(False)
    return run


def _forwards(model: torch.nn.Module, batches: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            for b in batches:
                model(b)
        return None
    return run


def _quiet(fn: Callable[[], object]) -> object:
    """``fn()`` without the random-init warning a build with ``weights="none"`` issues."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normswap.sources.RandomInitWarning)
        return fn()


def _chain(*fns: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        for fn in fns:
            fn()
        return None
    return run


def _convert_floor(model: torch.nn.Module) -> Callable[[], object]:
    """What a conversion that proves its exact start cannot avoid: one trace, one copy of every tensor (the
    converted model owns its weights), one forward of the probe batch (the original's outputs to compare with), on
    one thread where the probe is small, as ``convert`` runs it (normswap.core.threads: the faster way here)."""
    probe = normswap.sources.example_input(model)
    small = is_small(probe)

    def run() -> object:
        torch.fx.symbolic_trace(model)
        [t.clone() for t in model.state_dict().values()]
        with torch.no_grad(), serial() if small else contextlib.nullcontext():
            model(*probe.args, **probe.kwargs)
        return None
    return run


def _save_floor(model: torch.nn.Module, path: Path) -> Callable[[], object]:
    """What an atomic, checksummed save cannot avoid: the state_dict's bytes hashed once and written once, fsynced."""
    def run() -> object:
        tensors = [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy() for t in model.state_dict().values()]
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for b in tensors:
                h.update(b)
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        return h.hexdigest()
    return run


def _by_name(name: str) -> bool:
    """Whether ``name`` is a torchvision model ``normswap.convert`` can build by name (not the suite's stand-in)."""
    return name != "tiny_resnet"


def run(bench: Bench) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="normswap-bench-") as tmp:
        return _run(bench, Path(tmp))


def _run(bench: Bench, tmp: Path) -> dict[str, Any]:
    sz, dev = bench.sizes, bench.device
    rows: list[dict[str, Any]] = []
    reps, warm = int(sz["tool_repeats"]), int(sz.get("tool_warmup", bench.warmup))

    name = sz["convert_model"]
    bench.log(f"convert {name}")
    model = build(name, 224)
    out = tmp / "converted.safetensors"
    fns = {"fx.symbolic_trace": lambda: torch.fx.symbolic_trace(model), "plan (uan)": lambda: normswap.plan(model, to="uan"),
           "convert (uan)": lambda: normswap.convert(model, to="uan"),
           "convert + save (uan)": lambda: normswap.convert(model, to="uan").save(out, force=True),
           "convert (patchnorm)": lambda: normswap.convert(model, to="patchnorm"),
           "convert (anact)": lambda: normswap.convert(model, to="anact"), "floor": _convert_floor(model)}
    saved = tmp / "saved.safetensors"
    converted = normswap.convert(model, to="uan")
    converted.save(saved)
    fns.update({"save (uan)": lambda: converted.save(out, force=True),
                "load (uan)": lambda: normswap.load(saved, model=model),
                "floor + save": _chain(_convert_floor(model), _save_floor(model, tmp / "floor.bin"))})
    if _by_name(name):  # what `normswap convert resnet50` runs: the build (random init) and a probe it infers
        _quiet(lambda: normswap.convert(name, to="uan", weights="none")).save(tmp / "named.safetensors")
        fns.update({"build (no weights)": lambda: build(name, 224),
                    "convert by name (uan)": lambda: _quiet(lambda: normswap.convert(name, to="uan", weights="none")),
                    "load by name (uan)": lambda: normswap.load(tmp / "named.safetensors")})
    rows += bench.compare("conversion", f"{name} (random init)", fns, "fx.symbolic_trace",
                          int(sz.get("convert_repeats", reps)), warmup=int(sz.get("convert_warmup", warm)))

    name, size, n = sz["tool_model"], sz["tool_size"], sz["calib_samples"]
    torch.manual_seed(0)
    base = build(name, size).to(dev)
    base.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so EM and the gains have something to fit
        base(torch.randn(16, 3, size, size, device=dev))
    base.eval()
    inputs = torch.randn(max(n, sz["eval_samples"]), 3, size, size)
    data = tmp / "inputs.safetensors"
    save_file({"inputs": inputs}, str(data))
    batches = list(inputs[:n].to(dev).split(16))
    for variant, strength in (("uan", 0.0), ("patchnorm", 1.0), ("anact", 0.0)):
        bench.log(f"calibrate {name} {variant}")
        r = normswap.convert(base, to=variant, strength=strength, example_inputs=batches[0][:2])
        calib = lambda r=r: normswap.calibrate(r, str(data), original=base, calib_samples=n, batch_size=16,  # noqa: E731
                                               evaluate=False)
        fns = {"forwards": _forwards(base, batches), f"calibrate ({variant})": calib}
        if native_available():  # the same call on the torch paths every kernel keeps as its fallback
            fns[f"calibrate ({variant}) eager"] = _eager(calib)
        if variant == "patchnorm":
            fns["floor"] = _chain(_forwards(base, batches), _forwards(r.model, batches))
        rows += bench.compare("calibration", f"{name}, {n} samples at {size} px", fns, "forwards", reps, warmup=warm,
                              variant=variant)

    m = sz["eval_samples"]
    bench.log(f"evaluate {name}")
    r = normswap.convert(base, to="uan", strength=0.5, example_inputs=batches[0][:2])
    ev = lambda: normswap.evaluate(r, str(data), original=base, eval_samples=m, batch_size=32)  # noqa: E731
    eval_batches = list(inputs[:m].to(dev).split(32))
    at1 = copy.deepcopy(r.model)
    set_strengths(at1, 1.0)
    floor = _chain(*(_forwards(x, eval_batches) for x in (base, r.model, at1)))
    row = bench.compare("evaluation", f"{name}, {m} samples at {size} px", {
        "forwards": _forwards(base, eval_batches), "evaluate (uan)": ev, "floor": floor}, "forwards", reps,
        warmup=warm)
    peak = peak_rise_mib(ev, dev)
    for x in row:
        if x["candidate"] == "evaluate (uan)":
            x["peak_mib"] = peak
    rows += row
    return {"title": "3. The tool itself", "how": HOW, "kind": "speed", "rows": rows}
