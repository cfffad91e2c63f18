"""OpenMP wait policy and thread count on a loaded machine: which setting to recommend (docs/speed.md).

    .venv/bin/python -m benchmarks.threads [--rounds 3] [--forwards 15] [--load N] [--out benchmarks/results/threads.json]

A policy is fixed when OpenMP starts, so each setting runs in its own child process; the settings take turns
(round-robin, ``--rounds`` times) so load changes on a shared machine hit them alike. Each child times
``--forwards`` MobileNetV2 forwards (batch 8, 160 px, after two warm-up calls) and reports the median,
90th percentile and worst time per forward. ``--load N`` runs N busy processes (each spinning on one core) for the
whole measurement: a machine shared with other jobs, made repeatable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "default, 2 threads": {"OMP_NUM_THREADS": "2"},
    "PASSIVE, 2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "ACTIVE, 2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
CHILD = """
import sys, time, json, torch
sys.path.insert(0, %r)
import normswap
from normswap.compat import import_torchvision
import_torchvision()
import torchvision
m = torchvision.models.mobilenet_v2(weights=None).eval()
x = torch.randn(8, 3, 160, 160)
ts = []
with torch.inference_mode():
    for i in range(%d + 2):
        t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
print(json.dumps(ts[2:]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=15)
    parser.add_argument("--load", type=int, default=0, help="busy processes to run alongside (default 0)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    loads = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(0, args.load))]
    try:
        for _ in range(args.rounds):
            for name, env in SETTINGS.items():
                child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
                child_env.update(env, HF_HUB_OFFLINE="1")
                loads.append(os.getloadavg()[0])
                res = subprocess.run([sys.executable, "-c", CHILD % (str(ROOT), args.forwards)], env=child_env,
                                     capture_output=True, text=True, check=True)
                times[name] += json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        for p in busy:
            p.kill()
            p.wait()
    results = {}
    for name, ts in times.items():
        ts = sorted(ts)
        results[name] = {"median_ms": 1e3 * statistics.median(ts), "p90_ms": 1e3 * ts[int(0.9 * (len(ts) - 1))],
                         "max_ms": 1e3 * ts[-1], "forwards": len(ts)}
        r = results[name]
        print(f"{name:20s} median {r['median_ms']:7.0f} ms  p90 {r['p90_ms']:7.0f} ms  max {r['max_ms']:7.0f} ms")
    results["_meta"] = {"load_min": min(loads), "load_max": max(loads), "cpus": os.cpu_count(), "busy": args.load}
    path = Path(args.out)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
