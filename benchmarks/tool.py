"""Section 3, the tool itself: conversion (find + apply + verify + save) against ``torch.fx.symbolic_trace``
alone; calibration against plain forwards over the same batches; ``normswap.evaluate`` (what ``normswap eval``
runs) against plain forwards over the same samples."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

import normswap
from normswap.variants import set_strengths

from .models import build
from .timing import Bench, peak_rise_mib

HOW = ("Public API calls timed whole, interleaved with their baseline. Conversion: `normswap.plan` (find), "
       "`normswap.convert` (find, copy, apply, verify on the probe batch), and convert + `save` to a temporary "
       "file, against `torch.fx.symbolic_trace` of the same model (random init); its `floor` is what a conversion "
       "that proves its exact start cannot avoid: one trace, one copy of every tensor, one forward of the probe. Calibration: "
       "`normswap.calibrate(..., evaluate=False)` on N inputs stored in a `.safetensors` file (batches of 16), "
       "against plain forwards of the original over the same batches: the ratio is time per sample, its inverse "
       "the throughput (UAN and ANAct converted at strength 0, PatchNorm at 1, the strength each is calibrated "
       "at). PatchNorm's `floor` is what its network-order calibration cannot avoid: a forward of the original "
       "(the targets) and one of the converted model at strength 1 (each layer's input) per batch. Evaluation: "
       "`normswap.evaluate` (UAN at strength 0.5: the original and the model at 0, 0.5, 1, per-site errors) "
       "against plain forwards of the original over the same samples; its `floor` is the forwards of the rows "
       "it reports (the original, the model at 0, 0.5 and 1: a converted model at 0 is another module tree, so "
       "the report runs it to show its agreement on the data), batches of 32; its peak is the rise of this process's peak resident set over one call.")


def _forwards(model: torch.nn.Module, batches: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            for b in batches:
                model(b)
        return None
    return run


def _chain(*fns: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        for fn in fns:
            fn()
        return None
    return run


def _convert_floor(model: torch.nn.Module) -> Callable[[], object]:
    """What a conversion that proves its exact start cannot avoid: one trace, one copy of every tensor (the
    converted model owns its weights), one forward of the probe batch (the original's outputs to compare with)."""
    probe = normswap.sources.example_input(model)

    def run() -> object:
        torch.fx.symbolic_trace(model)
        [t.clone() for t in model.state_dict().values()]
        with torch.no_grad():
            model(*probe.args, **probe.kwargs)
        return None
    return run


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
    rows += bench.compare("conversion", f"{name} (random init)", fns, "fx.symbolic_trace", reps, warmup=warm)

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
        if variant == "patchnorm":
            fns["floor"] = _chain(_forwards(base, batches), _forwards(r.model, batches))
        rows += bench.compare("calibration", f"{name}, {n} samples at {size} px", fns, "forwards", reps, warmup=warm,
                              variant=variant)

    m = sz["eval_samples"]
    bench.log(f"evaluate {name}")
    r = normswap.convert(base, to="uan", strength=0.5, example_inputs=batches[0][:2])
    ev = lambda: normswap.evaluate(r, str(data), original=base, eval_samples=m, batch_size=32)  # noqa: E731
    eval_batches = list(inputs[:m].to(dev).split(32))
    at = {s: copy.deepcopy(r.model) for s in (0.0, 1.0)}
    for s, m_s in at.items():
        set_strengths(m_s, s)
    floor = _chain(*(_forwards(x, eval_batches) for x in (base, at[0.0], r.model, at[1.0])))
    row = bench.compare("evaluation", f"{name}, {m} samples at {size} px", {
        "forwards": _forwards(base, eval_batches), "evaluate (uan)": ev, "floor": floor}, "forwards", reps,
        warmup=warm)
    peak = peak_rise_mib(ev, dev)
    for x in row:
        if x["candidate"] == "evaluate (uan)":
            x["peak_mib"] = peak
    rows += row
    return {"title": "3. The tool itself", "how": HOW, "kind": "speed", "rows": rows}
