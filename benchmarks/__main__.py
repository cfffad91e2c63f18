"""normswap's benchmarks in one command: layer speed, whole models, the tool, accuracy retention, the papers'
claims. Writes OUT/benchmarks.json, OUT/benchmarks.md (generated from the JSON) and the plots.

    .venv/bin/python -m benchmarks [--profile quick|full|tiny] [--only layers,models,tool,accuracy,claims]
        [--out docs] [--threads N] [--device cpu|cuda] [--render]
"""

from __future__ import annotations

import os

# Sleeping OpenMP waiters: on a shared machine spinning ones are held up by other jobs (docs/speed.md).
# Read when OpenMP starts, so before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

import normswap  # noqa: E402,F401  (before torchvision: the import guard)
from normswap.io import atomic_write  # noqa: E402

from . import accuracy, claims, layers, models, report, targets, timing, tool  # noqa: E402
from .profiles import PROFILES  # noqa: E402

SECTIONS: dict[str, Callable[[timing.Bench], dict[str, Any]]] = {
    "layers": layers.run, "models": models.run, "tool": tool.run, "accuracy": accuracy.run, "claims": claims.run}


def load_note(machine: dict[str, Any], others: float | None) -> str:
    load = machine.get("load_average") or [0.0]
    share = "unknown" if others is None else f"{100 * others:.0f} %"
    return (f"Measured under load: this machine is shared (load average {load[0]:.1f} on {machine['cpu_count']} "
            f"cores at the start; other processes used {share} of its CPU time over the whole run). Ratios are "
            "taken within each round, so load that lasts hits both sides alike; load that comes and goes widens "
            "the IQR and is flagged. Compare figures with their own baseline, never across rows or runs.")


def write(res: dict[str, Any], out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report.plot(res, out)
    res["targets"] = targets.evaluate(res["sections"])
    text = json.dumps(res, indent=1, sort_keys=False) + "\n"
    atomic_write(out / "benchmarks.json", lambda tmp: Path(tmp).write_text(text))
    md = report.render(res)
    atomic_write(out / "benchmarks.md", lambda tmp: Path(tmp).write_text(md))


def run(profile: str, only: list[str], out: Path, threads: int, device: torch.device,
        clock: timing.Clock = time.perf_counter, log: Callable[[str], None] = print,
        command: str | None = None) -> dict[str, Any]:
    """Run the sections in ``only`` with ``profile``'s sizes; merge them into ``out/benchmarks.json``."""
    torch.set_num_threads(threads)
    allocator = timing.pin_allocator()
    machine = {**timing.machine_info(device, threads), "allocator": allocator, "native": timing.native_info()}
    log(f"machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine['platform']}")
    log(f"torch {machine['torch']}, device {device}, {threads} thread(s), OMP_WAIT_POLICY="
        f"{machine['omp_wait_policy']}, load average {machine['load_average']}; {allocator}; {machine['native']}")
    path = out / "benchmarks.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if res.get("profile") != profile:
        res = {}
    res.update(profile=profile, machine=machine, method=timing.__doc__.split("\n\n", 1)[1].strip(),
               command=command or f"python -m benchmarks --profile {profile}")
    sections = res.setdefault("sections", {})
    bench = timing.Bench(PROFILES[profile], device=device, clock=clock, log=log)
    t0, meter = time.perf_counter(), timing.OthersMeter()
    for name in only:
        log(f"== {name}")
        s0 = time.perf_counter()
        sec = SECTIONS[name](bench)
        sec["seconds"] = round(time.perf_counter() - s0, 1)
        log(f"== {name}: {sec['seconds']:.0f} s")
        sections[name] = sec
        res["sections"] = {k: sections[k] for k in SECTIONS if k in sections}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["load_note"] = load_note(machine, meter.stop())
        write(res, out, plots=name == only[-1])  # after every section: an interrupted run keeps what it measured
    log(f"wrote {out / 'benchmarks.json'} and {out / 'benchmarks.md'} in {res['seconds'] / 60:.1f} min")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--render", action="store_true", help="only regenerate OUT/benchmarks.md from OUT/benchmarks.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        res = json.loads((out / "benchmarks.json").read_text())
        md = report.render(res)
        atomic_write(out / "benchmarks.md", lambda tmp: Path(tmp).write_text(md))
        print(f"wrote {out / 'benchmarks.md'}")
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run(args.profile, only, out, args.threads, torch.device(args.device), command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
