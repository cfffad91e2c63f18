"""docs/benchmarks.md, generated from docs/benchmarks.json (and the plots next to it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .claims import agreement

USAGE = [
    "OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m benchmarks --profile quick   # this page (under 30 min on 2 cores)",
    ".venv/bin/python -m benchmarks --profile full                           # the issues' sizes, more rounds and seeds",
    ".venv/bin/python -m benchmarks --only layers,tool --out /tmp/b          # some sections (merged into the JSON there)",
    ".venv/bin/python -m benchmarks --render                                 # this page again from docs/benchmarks.json",
]
PLOTS = {"layers": "benchmarks-layers.png", "claims": "benchmarks-mlp-batch.png"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _speed(sec: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sec["rows"]:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        mem = any(r.get("peak_mib") is not None for r in rows)
        head = ["what", "candidate / baseline", "ratio (median)", "IQR", "min-max", "baseline ms", "candidate ms",
                "self", "drift", "others' CPU", "flags"] + (["peak MiB (ratio)"] if mem else [])
        body = []
        for r in rows:
            if "skipped" in r:
                body.append([r["what"], r["candidate"], "skipped", r["skipped"]] + [""] * (len(head) - 4))
                continue
            cells = [r["what"], f"{r['candidate']} / {r['baseline']}", f"**{r['ratio']:.2f}x**",
                     f"{r['q1']:.2f}-{r['q3']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}", f"{r['base_ms']:.1f}",
                     f"{r['new_ms']:.1f}", f"{r.get('self_ratio', float('nan')):.2f}", f"{r['drift']:.2f}",
                     "-" if r.get("others_cpu") is None else f"{100 * r['others_cpu']:.0f} %", ", ".join(r["flags"])]
            if mem:
                m, ratio = r.get("peak_mib"), r.get("memory_ratio")
                cells.append("-" if m is None else f"{m:.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
            body.append(cells)
        lines += [f"**{group}** ({rows[0].get('repeats', '-')} rounds)", "", *_table(head, body)]
    return lines


def _accuracy(sec: dict[str, Any]) -> list[str]:
    head = ["model", "recipe (overrides)", "steps", "held-out", "original", "before calibration",
            "after calibration", "fine-tuned, strength 1", "control", "seconds"]

    def cell(f: dict[str, Any]) -> str:
        if f.get("agreement") is None:
            return "-"
        acc = f" / acc {_pct(f['accuracy'])}" if f.get("accuracy") is not None else ""
        return f"agree {_pct(f['agreement'])}{acc}"
    body = [[r["model"], f"`{r['recipe']}`" + (f" ({', '.join(r['overrides'])})" if r["overrides"] else ""),
             str(r["steps"]), str(r["samples"]),
             "-" if r["original"].get("accuracy") is None else f"acc {_pct(r['original']['accuracy'])}",
             cell(r["before_calibration"]), cell(r["after_calibration"]), cell(r["fine_tuned"]), cell(r["control"]),
             f"{r['seconds']:.0f}"] for r in sec["rows"]]
    return _table(head, body)


def _claims(sec: dict[str, Any]) -> list[str]:
    mlp = [r for r in sec["rows"] if r["group"] == "mlp"]
    batches = sorted({r["batch"] for r in mlp})
    names = list(dict.fromkeys(r["model"] for r in mlp))
    body = [[n] + [next(f"{_pct(r['mean'])} ± {100 * r['std']:.1f}" for r in mlp if r["model"] == n and r["batch"] == b)
                   for b in batches] for n in names]
    sz = sec.get("sizes", {})
    lines = [f"MLP (width {sz.get('mlp_width')}, {sz.get('mlp_epochs')} epochs, {sz.get('seeds')} seeds, "
             f"{sz.get('claim_train')} training / {sz.get('claim_test')} test items): test accuracy", "",
             *_table(["layer"] + [f"batch {b}" for b in batches], body)]
    cnn = [r for r in sec["rows"] if r["group"] == "cnn"]
    lines += [f"CNN ({sz.get('cnn_epochs')} epoch(s), batch {sz.get('cnn_batch')}): test accuracy", "",
              *_table(["model", "mean ± std", "per seed"],
                      [[r["model"], f"{_pct(r['mean'])} ± {100 * r['std']:.1f}",
                        ", ".join(f"{100 * a:.1f}" for a in r["accs"])] for r in cnn])]
    lines += ["What the papers claim against what came out here:", "",
              *_table(["claim (docs/methods.md)", "ours", "verdict"],
                      [[c["claim"], c["ours"], f"**{agreement(c['agrees'])}**"] for c in sec["claims"]])]
    for state, text in ((False, "Where our numbers disagree with the papers"), (None, "Not shown at this scale")):
        hits = [c["claim"] for c in sec["claims"] if c["agrees"] is state]
        lines += [f"{text}: " + ("; ".join(hits) if hits else "none") + ".", ""]
    return lines


def render(res: dict[str, Any]) -> str:
    """The whole page from the results JSON (deterministic: the same JSON gives the same bytes)."""
    m = res["machine"]
    load = m.get("load_average")
    lines = ["# Benchmarks", "",
             "<!-- GENERATED from docs/benchmarks.json by the benchmark harness: do not edit by hand. -->",
             f"Generated by `{res['command']}` (profile `{res['profile']}`, {res['seconds'] / 60:.1f} minutes); "
             "`.venv/bin/python -m benchmarks --render` regenerates this page from `docs/benchmarks.json` alone. "
             "What the speed work changed, and the thread-policy advice: [docs/speed.md](speed.md).", "",
             "```bash", *USAGE, "```", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}, Python {m['python']}, torch "
             f"{m['torch']}, device `{m['device']}`{', ' + m['gpu'] if m.get('gpu') else ''}, {m['threads']} "
             f"thread(s), `OMP_WAIT_POLICY={m['omp_wait_policy']}`; load average at the start "
             f"{', '.join(map(str, load)) if load else 'unknown'}"
             f"{'; ' + m['allocator'] if m.get('allocator') else ''}"
             f"{'; ' + m['native'] if m.get('native') else ''}.", ""]
    lines += [res.get("load_note", ""), "", "## How the speed figures are measured", "", res["method"], "",
              "## Targets (issues 13 and 14)", "",
              *_table(["issue", "what", "today (here)", "target", "met", "measured as"],
                      [[t["issue"], t["what"], t["today"], t["target"],
                        {True: "yes", False: "**no**", None: "-"}[t["met"]], t.get("where", "")]
                       for t in res["targets"]])]
    for key, sec in res["sections"].items():
        lines += [f"## {sec['title']}", "", f"How: {sec['how']}", ""]
        lines += {"speed": _speed, "accuracy": _accuracy, "claims": _claims}[sec["kind"]](sec)
        if key in PLOTS and sec.get("plot"):
            lines += [f"![{sec['title']}]({sec['plot']})", ""]
        lines += [f"- {n}" for n in sec.get("notes", [])] + ([""] if sec.get("notes") else [])
    return "\n".join(lines).rstrip() + "\n"


def plot(res: dict[str, Any], out_dir: Path) -> None:
    """The PNGs the page shows, from the results; records each plot's file name in its section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = res["sections"]
    if "layers" in secs:
        rows = [r for r in secs["layers"]["rows"] if r["group"] == "eval" and "ratio" in r]
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
        labels = [f"{r['what'].split(' (')[0]}: {r['candidate']}" for r in rows]
        med = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["q1"] for r in rows], [r["q3"] - r["ratio"] for r in rows]]
        ax.barh(range(len(rows)), med, xerr=err, color="tab:blue", alpha=0.7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("time / the replaced layer's time (median, IQR), eval")
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["layers"], dpi=90)
        plt.close(fig)
        secs["layers"]["plot"] = PLOTS["layers"]
    if "claims" in secs:
        mlp = [r for r in secs["claims"]["rows"] if r["group"] == "mlp"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["model"] for r in mlp):
            rs = [r for r in mlp if r["model"] == name]
            ax.errorbar([r["batch"] for r in rs], [100 * r["mean"] for r in rs], [100 * r["std"] for r in rs],
                        marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (same epochs, same learning rate)")
        ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
        ax.set_title("Plain-SGD MLP on Fashion-MNIST")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["claims"], dpi=90)
        plt.close(fig)
        secs["claims"]["plot"] = PLOTS["claims"]
