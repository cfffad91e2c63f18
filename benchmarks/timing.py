"""How every speed figure is measured: interleaved rounds, medians, spread and a contamination check.

A measurement times a baseline and one or more candidates in the same process, one call of each per round
(the order reversed every other round, so position effects cancel), after warm-up calls. Each candidate's
figure is the median of its per-round ratios to the baseline, with the interquartile range and the extremes.
Contamination check: every round also calls the baseline a second time, and the median ratio of that call to
the baseline's first (``self``, the baseline-vs-itself ratio: 1.00 when the measurement is unbiased) shows what
position in the round and the load alone do to a ratio; the baseline's median in the second half of the rounds
against the first half (``drift``: load that changed during the row); the ratios' relative IQR (``spread``:
load that came and went); and the share of the machine's CPU time other processes used meanwhile
(``others_cpu``). A row is flagged ``noisy`` when its spread exceeds 0.25, ``drift`` when its drift is
beyond 1 +- 0.20, ``self`` when the baseline-vs-itself ratio is beyond 1 +- 0.10; its figure is kept but
marked in every table.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

SPREAD_LIMIT = 0.25  # relative IQR of the per-round ratios above which a row is flagged "noisy"
DRIFT_LIMIT = 0.20  # |baseline second half / first half - 1| above which a row is flagged "drift"
SELF_LIMIT = 0.10  # |baseline (again) / baseline - 1| above which every row of that measurement is flagged "self"
Clock = Callable[[], float]


MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold: every tensor below it is reused heap memory
TRIM_THRESHOLD = 1 << 30


def pin_allocator() -> str:
    """Fix glibc malloc's mmap and trim thresholds for the rest of the process, and say what was done.

    glibc serves a block above its mmap threshold (128 KiB at start) with a fresh ``mmap``, unmapped on free, so
    each call page-faults its outputs; freeing such a block raises the threshold to the block's size, after which
    the same sizes are reused heap memory. When that flip happens depends on everything the process freed before,
    so a row's baseline (its outputs page-faulting or not) depended on the rows before it: the depthwise PatchNorm
    row read 4.2x in the harness and 1.0-2.6x in fresh processes (docs/speed.md, "Fourth pass: PatchNorm").
    Pinned, every row measures the reused-memory state a long-running job sees, whatever ran before it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MMAP_THRESHOLD) == 1 and libc.mallopt(-1, TRIM_THRESHOLD) == 1  # M_MMAP_/M_TRIM_
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "allocator as the platform sets it (no glibc mallopt)"
    return f"glibc malloc pinned: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 30} GiB"


def trim_heap() -> None:
    """Return glibc's free heap memory to the system (``malloc_trim(0)``); nothing elsewhere. With the trim
    threshold pinned high, freed memory stays resident, and a peak-memory rise measured from there would not count
    memory a call takes back from the free heap."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def native_info() -> str:
    """Whether normswap's native kernels (docs/native.md) run in the default path here, and their vector width."""
    from normswap import native
    from normswap.errors import NormswapError

    try:
        ops = native.ops()
    except NormswapError as e:
        return f"normswap native kernels off ({e})"
    if ops is None:
        return f"normswap native kernels off (NORMSWAP_NATIVE={native.mode()}, or not built)"
    return f"normswap native kernels on ({ops.float_lanes()} float lanes)"


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the figures were measured on (printed first, stored in the JSON)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "device": str(device), "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux; else None)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class OthersMeter:
    """Share of the machine's CPU capacity that *other* processes used between start and stop."""

    def __init__(self) -> None:
        self.b0, self.s0, self.w0 = _busy_s(), time.process_time(), time.perf_counter()

    def stop(self) -> float | None:
        b1, s1, w1 = _busy_s(), time.process_time(), time.perf_counter()
        if self.b0 is None or b1 is None or w1 <= self.w0:
            return None
        return round(max(0.0, (b1 - self.b0) - (s1 - self.s0)) / ((w1 - self.w0) * (os.cpu_count() or 1)), 3)


def interleave(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, *,
               device: torch.device = torch.device("cpu"), clock: Clock = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds of one call each (order reversed on odd rounds)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = clock()
            fns[name]()
            synchronize(device)
            samples[name].append(clock() - t)
    return samples


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def ratio_stats(samples: dict[str, list[float]], base: str, new: str) -> dict[str, Any]:
    """Median, IQR and extremes of ``new / base`` over the rounds, with the contamination check."""
    b, n = samples[base], samples[new]
    ratios = [y / x for x, y in zip(b, n) if x > 0]
    q1, med, q3 = _quartiles(ratios)
    half = len(b) // 2
    drift = statistics.median(b[half:]) / statistics.median(b[:half]) if half >= 1 else 1.0
    spread = (q3 - q1) / med if med > 0 else float("inf")
    flags = []
    if spread > SPREAD_LIMIT:
        flags.append("noisy")
    if abs(drift - 1) > DRIFT_LIMIT:
        flags.append("drift")
    return {"ratio": med, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios), "spread": spread,
            "drift": drift, "base_ms": 1e3 * statistics.median(b), "new_ms": 1e3 * statistics.median(n),
            "repeats": len(ratios), "flags": flags}


class Bench:
    """The measuring context a section gets: sizes, repeats, device, clock; it collects the rows."""

    def __init__(self, sizes: dict[str, Any], *, device: torch.device, clock: Clock = time.perf_counter,
                 log: Callable[[str], None] = print) -> None:
        self.sizes, self.device, self.clock, self.log = sizes, device, clock, log
        self.repeats, self.warmup = int(sizes["repeats"]), int(sizes["warmup"])

    def compare(self, group: str, what: str, fns: dict[str, Callable[[], object]], base: str,
                repeats: int | None = None, also_vs: str | None = None, warmup: int | None = None,
                **extra: Any) -> list[dict[str, Any]]:
        """Interleave ``fns`` and return one row per candidate (every name but ``base``); with ``also_vs``,
        the same rounds again as ratios to that second baseline (group ``"<group> vs <also_vs>"``)."""
        meter = OthersMeter()
        again = f"{base} (again)"  # the baseline a second time in every round: the baseline-vs-itself ratio
        samples = interleave({**fns, again: fns[base]}, repeats or self.repeats,
                             self.warmup if warmup is None else warmup, device=self.device, clock=self.clock)
        others = meter.stop()
        self_ratio = ratio_stats(samples, base, again)["ratio"]
        rows = []
        pairs = [(group, base, n) for n in fns if n != base]
        if also_vs is not None:
            pairs += [(f"{group} vs {also_vs}", also_vs, n) for n in fns if n not in (base, also_vs)]
        for grp, b, name in pairs:
            row = {"group": grp, "what": what, "baseline": b, "candidate": name,
                   **ratio_stats(samples, b, name), "self_ratio": self_ratio, "others_cpu": others, **extra}
            if abs(self_ratio - 1) > SELF_LIMIT:
                row["flags"].append("self")
            rows.append(row)
            flag = f" [{', '.join(row['flags'])}]" if row["flags"] else ""
            self.log(f"  {grp} {what}: {name} / {b} = {row['ratio']:.2f}x (IQR {row['q1']:.2f}-{row['q3']:.2f}){flag}")
        return rows

    def skipped(self, group: str, what: str, candidate: str, reason: str) -> dict[str, Any]:
        self.log(f"  {group} {what}: {candidate} skipped: {reason}")
        return {"group": group, "what": what, "candidate": candidate, "skipped": reason}


def rss_kib(peak: bool = False, reset: bool = False) -> int | None:
    """The resident set (or its peak since the last reset) in KiB (Linux; else None)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        key = "VmHWM:" if peak else "VmRSS:"
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return None


def peak_rise_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """How far one call of ``fn`` raises peak memory above what was in use before it, in MiB
    (CUDA: the allocator's peak; CPU: the resident-set peak, Linux only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    trim_heap()  # free heap pages leave the resident set, so that reusing them counts as a rise
    before = rss_kib(reset=True)
    if before is None:
        return None
    fn()
    peak = rss_kib(peak=True)
    return None if peak is None else (peak - before) / 1024
