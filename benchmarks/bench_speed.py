"""Speed of normswap's layers and operations against their baselines: the table of docs/benchmarks.md
(issue 14).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_speed.py [--rows uan_r50,anact_mnv2,...]
        [--repeats 7] [--warmup 2] [--threads 2] [--out benchmarks/results/speed.json]

Every row is a ratio measured in this process: the operation and its baseline are interleaved (one call
of each per round, so load changes on a shared machine hit both alike), after warm-up; the median of the
per-round ratios is reported with its spread (min, max). Peak forward memory is measured in child
processes (the rise of the resident-set peak over one forward, original and converted in separate
processes). Models are torchvision's, randomly initialised (speed does not depend on the weights); the
sizes are in ``SIZES`` and in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Sleeping OpenMP waiters: on a shared machine spinning ones are held up by other jobs (docs/benchmarks.md).
# Read when OpenMP starts, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import normswap  # noqa: E402  (before torchvision: the import guard)
from normswap.compat import import_torchvision  # noqa: E402

import_torchvision()
import torchvision  # noqa: E402

SIZES = {"r50_infer": (4, 160), "mnv2_infer": (8, 160), "r50_train": (2, 128), "calib": (64, 160),
         "eval": (64, 160)}


def interleaved(base: Callable[[], object], new: Callable[[], object], repeats: int, warmup: int) -> dict:
    """Median and spread of ``new / base`` over rounds that time one call of each, in turn."""
    for _ in range(warmup):
        base(), new()
    ratios, tb, tn = [], [], []
    for r in range(repeats):
        pair = []
        for fn in ((base, new) if r % 2 == 0 else (new, base)):  # alternate the order too
            t = time.perf_counter()
            fn()
            pair.append((fn, time.perf_counter() - t))
        b = next(s for f, s in pair if f is base)
        n = next(s for f, s in pair if f is new)
        tb.append(b), tn.append(n), ratios.append(n / b)
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "base_ms": 1e3 * statistics.median(tb), "new_ms": 1e3 * statistics.median(tn), "repeats": repeats}


def models(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def converted(model: nn.Module, variant: str, strength: float, options: dict | None = None) -> nn.Module:
    return normswap.convert(model, to=variant, strength=strength, options=options or {}).model.eval()


def _infer(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(dim=1).sum().backward()
    return run


def rss_kib(reset: bool = False, peak: bool = False) -> int:
    """The resident set (or its peak since the last reset) in KiB, from /proc (Linux)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    key = "VmHWM:" if peak else "VmRSS:"
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1])


def peak_forward_mib(spec: str) -> float:
    """Child process: build ``spec`` (``arch:variant:strength:batch:size``), then the resident-set peak's rise
    over one inference forward, in MiB."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import benchmarks.bench_speed as b;"
        "arch, variant, s, n, h = %r.split(':'); m = b.models(arch);"
        "m = b.converted(m, variant, float(s), {'k': 3} if variant == 'uan' else None) if variant != 'none' else m;"
        "x = torch.randn(int(n), 3, int(h), int(h)); import gc; gc.collect(); r0 = b.rss_kib(reset=True);"
        "b._infer(m, x)(); print((b.rss_kib(peak=True) - r0) / 1024)"
    ) % (str(ROOT), spec)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def row_uan_infer(arch: str, size: tuple[int, int], args) -> dict:
    n, h = size
    base = models(arch)
    uan = converted(models(arch), "uan", 1.0, {"k": 3})
    x = torch.randn(n, 3, h, h)
    out = interleaved(_infer(base, x), _infer(uan, x), args.repeats, args.warmup)
    if args.memory:
        m0, m1 = peak_forward_mib(f"{arch}:none:0:{n}:{h}"), peak_forward_mib(f"{arch}:uan:1:{n}:{h}")
        out.update(peak_mib_base=m0, peak_mib_new=m1, memory_ratio=m1 / max(m0, 1e-9))
    return out


def row_uan_r50(args) -> dict:
    return row_uan_infer("resnet50", SIZES["r50_infer"], args)


def row_uan_mnv2(args) -> dict:
    return row_uan_infer("mobilenet_v2", SIZES["mnv2_infer"], args)


def row_uan_r50_train(args) -> dict:
    n, h = SIZES["r50_train"]
    base = models("resnet50")
    uan = converted(models("resnet50"), "uan", 1.0, {"k": 3})
    x = torch.randn(n, 3, h, h)
    return interleaved(_train_step(base, x), _train_step(uan, x), args.repeats, args.warmup)


def row_anact_mnv2(args) -> dict:
    n, h = SIZES["mnv2_infer"]
    base = models("mobilenet_v2")
    x = torch.randn(n, 3, h, h)
    anact = normswap.convert(models("mobilenet_v2"), to="anact", example_inputs=x).model.eval()
    return interleaved(_infer(base, x), _infer(anact, x), args.repeats, args.warmup)


def _calibration(variant: str, args) -> dict:
    """The calibration runner (every site of ``variant`` in MobileNetV2) against plain forwards over the same
    batches: ``ratio`` = calibration time / forward time (throughput = 1 / ratio)."""
    from normswap.calibration.runner import run_calibration

    n, h = SIZES["calib"]
    torch.manual_seed(0)
    base = models("mobilenet_v2")
    base.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics (EM and gains have something to fit)
        base(torch.randn(16, 3, h, h))
    base.eval()
    data = list(torch.randn(n, 3, h, h).split(16))
    result = normswap.convert(base, to=variant, strength=1.0 if variant == "patchnorm" else 0.0,
                              example_inputs=data[0])

    def forwards():
        with torch.no_grad():
            for b in data:
                base(b)

    out = interleaved(forwards, lambda: run_calibration(result.model, result.plan, data), max(2, args.repeats // 2), 1)
    out["throughput"] = 1.0 / out["ratio"]
    return out


def row_calib_uan(args) -> dict:
    return _calibration("uan", args)


def row_calib_patchnorm(args) -> dict:
    return _calibration("patchnorm", args)


def row_calib_anact(args) -> dict:
    return _calibration("anact", args)


def row_eval(args) -> dict:
    """What ``normswap eval`` runs (:func:`normswap.calibration.report.measure`: the original, the UAN model at
    strengths 0, 0.5 and 1, per-site errors at 0.5) against plain forwards of the original over the same
    samples, plus the peak resident-set rise of one measure call (child process)."""
    from normswap.calibration.report import measure

    n, h = SIZES["eval"]
    base = models("mobilenet_v2")
    result = normswap.convert(models("mobilenet_v2"), to="uan", strength=0.5, options={"k": 3})
    data = [(b, None) for b in torch.randn(n, 3, h, h).split(32)]

    def forwards():
        with torch.no_grad():
            for b, _ in data:
                base(b)

    out = interleaved(forwards, lambda: measure(base, {"converted": result.model}, result.plan, data,
                                                [0.0, 0.5, 1.0], 0.5), max(2, args.repeats // 2), 1)
    if args.memory:
        code = ("import sys, torch; sys.path.insert(0, %r); import benchmarks.bench_speed as b;"
                "from normswap.calibration.report import measure; import normswap;"
                "base = b.models('mobilenet_v2'); r = normswap.convert(b.models('mobilenet_v2'), to='uan',"
                " strength=0.5, options={'k': 3}); data = [(x, None) for x in torch.randn(%d, 3, %d, %d).split(32)];"
                "r0 = b.rss_kib(reset=True); measure(base, {'c': r.model}, r.plan, data, [0.0, 0.5, 1.0], 0.5);"
                "print((b.rss_kib(peak=True) - r0) / 1024)") % (str(ROOT), n, h, h)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out["peak_mib_new"] = float(res.stdout.strip().splitlines()[-1])
    return out


def _pn_layer(cin: int, cout: int, k: int, groups: int, h: int, args) -> dict:
    from normswap.variants.patchnorm import PatchNormConv

    torch.manual_seed(0)
    pair = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)).eval()
    with torch.no_grad():
        pair[1].running_var.uniform_(0.5, 1.5)
    pn = PatchNormConv.from_conv(pair[0], pair[1], strength=1.0).eval()
    x = torch.randn(8, cin, h, h)
    return interleaved(_infer(pair, x), _infer(pn, x), args.repeats * 3, args.warmup)


def row_pn_depthwise(args) -> dict:
    return _pn_layer(144, 144, 3, 144, 56, args)


def row_pn_1x1(args) -> dict:
    return _pn_layer(256, 64, 1, 1, 56, args)


def row_pn_mnv2(args) -> dict:
    n, h = SIZES["mnv2_infer"]
    base = models("mobilenet_v2")
    pn = converted(models("mobilenet_v2"), "patchnorm", 1.0)
    x = torch.randn(n, 3, h, h)
    return interleaved(_infer(base, x), _infer(pn, x), args.repeats, args.warmup)


def row_convert_r50(args) -> dict:
    """``normswap.convert(resnet50, to="uan")`` (plan, copy, verification on its probe) against
    ``torch.fx.symbolic_trace`` of the same model."""
    model = models("resnet50")
    return interleaved(lambda: torch.fx.symbolic_trace(model), lambda: normswap.convert(model, to="uan"),
                       max(3, args.repeats // 2), 1)


ROWS = {"uan_r50": row_uan_r50, "uan_mnv2": row_uan_mnv2, "uan_r50_train": row_uan_r50_train,
        "anact_mnv2": row_anact_mnv2, "calib_uan": row_calib_uan, "calib_patchnorm": row_calib_patchnorm,
        "calib_anact": row_calib_anact, "eval": row_eval, "pn_depthwise": row_pn_depthwise, "pn_1x1": row_pn_1x1,
        "pn_mnv2": row_pn_mnv2, "convert_r50": row_convert_r50}


# row: (what, the issue's figure, target, how the ratio reads)
TABLE = {
    "uan_r50": ("resnet50 inference, UAN K=3 at strength 1", "3.8x, 3.2x memory", "<= 1.3x, <= 1.5x memory"),
    "uan_mnv2": ("MobileNetV2 inference, UAN K=3 at strength 1", "7.3x, 4.2x memory", "<= 1.5x"),
    "uan_r50_train": ("resnet50 training step, UAN at strength 1", "4.6x", "<= 1.5x"),
    "pn_depthwise": ("PatchNorm depthwise 3x3 (144 ch, 56x56, batch 8) vs Conv+BN", "3.5-4.0x", "<= 1.3x"),
    "pn_1x1": ("PatchNorm 1x1 256->64 56x56 vs Conv+BN", "1.4-2.2x", "memory-traffic floor"),
    "pn_mnv2": ("MobileNetV2 inference, PatchNorm at strength 1", "1.63x", "<= 1.15x"),
    "anact_mnv2": ("MobileNetV2 inference, ANAct before export", "1.09x", "<= 1.05x"),
    "calib_uan": ("calibration time / forward time, UAN (MobileNetV2, 64 samples)", "20x (0.05x throughput)",
                  "<= 1.4x (>= 0.7x)"),
    "calib_patchnorm": ("calibration time / forward time, PatchNorm", "9x (0.11x)", "<= 1.4x (>= 0.7x)"),
    "calib_anact": ("calibration time / forward time, ANAct", "3.7x (0.27x)", "<= 1.4x (>= 0.7x)"),
    "eval": ("`normswap eval` (64 samples) vs plain forwards", "14x, 3 GB peak", "<= 3x, bounded memory"),
    "convert_r50": ("`normswap.convert(resnet50)` vs `fx.symbolic_trace`", "9.9x", "<= 3x"),
}


def markdown(results: dict) -> str:
    """The table of docs/benchmarks.md from results keyed ``row:before`` / ``row:after``."""
    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        text = f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        if "memory_ratio" in r:
            text += f", memory {r['memory_ratio']:.2f}x"
        if "peak_mib_new" in r:
            text += f", peak +{r['peak_mib_new']:.0f} MiB"
        return text
    lines = ["| what | issue 14 (its machine) | target | before (here) | after (here) |", "|---|---|---|---|---|"]
    for key, (what, issue, target) in TABLE.items():
        lines.append(f"| {what} | {issue} | {target} | {cell(results.get(key + ':before'))} | "
                     f"{cell(results.get(key + ':after'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--tag", default="", help="a label stored with the results (e.g. 'before')")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
            "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_before": os.getloadavg()[0], "sizes": SIZES}
    for name in args.rows.split(","):
        t = time.time()
        row = ROWS[name](args)
        row.update(meta, seconds=round(time.time() - t, 1), load_after=os.getloadavg()[0])
        key = f"{name}:{args.tag}" if args.tag else name
        results[key] = row
        print(f"{key:28s} x{row['ratio']:.2f} (min {row['ratio_min']:.2f}, max {row['ratio_max']:.2f})"
              + (f"  memory x{row['memory_ratio']:.2f}" if "memory_ratio" in row else "")
              + (f"  peak +{row['peak_mib_new']:.0f} MiB" if "peak_mib_new" in row else ""), flush=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
