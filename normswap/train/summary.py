"""The fine-tuning summary table and the training plot.

The table compares, on the held-out evaluation part, the original, the converted model before fine-tuning (at
the final strength), the fine-tuned model at strength 0 and at the final strength, and the control (the original
fine-tuned with the same budget), so a claim like "within a point of the control" compares like with like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normswap.io import atomic_write

__all__ = ["Summary", "plot_metrics"]


@dataclass
class Summary:
    """Rows of figures (label, strength, fidelity) plus what the run was."""

    recipe: dict[str, Any]
    data: dict[str, Any]
    sites: int
    variant: str
    device: str
    world_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, strength: float | None, fig: Any) -> None:
        self.rows.append({"model": label, "strength": strength, **fig.to_dict()})

    def add_saved(self, label: str, strength: float | None, path: Path) -> None:
        """A row from a figures file written earlier in the run (kept across a resume)."""
        if path.is_file():
            self.rows.append({"model": label, "strength": strength, **json.loads(path.read_text())})

    def row(self, label: str, strength: float | None = None) -> dict[str, Any]:
        """The row of ``label`` (at ``strength`` when several); KeyError if absent."""
        for r in self.rows:
            if r["model"] == label and (strength is None or r["strength"] == strength):
                return r
        raise KeyError(f"no summary row {label!r} at strength {strength}")

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "sites": self.sites, "device": self.device, "world_size": self.world_size,
                "data": self.data, "rows": self.rows, "training": self.training, "notes": self.notes,
                "recipe": self.recipe}

    def write(self, path: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))

    def render(self) -> str:
        head = ("model", "strength", "agreement", "logit cos", "KL", "accuracy")
        table = [head]
        for r in self.rows:
            s = "-" if r["strength"] is None else f"{r['strength']:g}"
            acc = "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f} %"
            table.append((r["model"], s, f"{100 * r['agreement']:.1f} %", f"{r['cosine']:.3f}", f"{r['kl']:.4f}", acc))
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * wd for wd in widths))
        n = self.rows[0]["samples"] if self.rows else 0
        title = (f"fine-tuning summary: {self.variant}, {self.sites} site(s), {n} held-out samples "
                 f"({self.data.get('description', '')})")
        for tag, t in self.training.items():
            extra = f", resumed at step {t['resumed_from']}" if t.get("resumed_from") else ""
            lines.append(f"{tag}: {t['steps']} steps in {t['seconds']:.0f} s{extra}")
        return "\n".join([title, *lines, *self.notes])


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_metrics(run_dir: Path, png: Path) -> Path | None:
    """Loss, strength and evaluation agreement over steps (converted and control runs) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {tag: _read(run_dir / f"{tag}-metrics.jsonl") for tag in ("converted", "control")}
    if not any(runs.values()):
        return None
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for tag, rows in runs.items():
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=tag, lw=1)
        evals = [(r["step"], 100 * r["eval_agreement"]) for r in rows if r.get("eval_agreement") is not None]
        if evals:
            axes[2].plot(*zip(*evals), marker="o", label=tag)
        if tag == "converted":
            axes[1].plot(steps, [r.get("strength", 0.0) for r in rows], color="C2")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].set_ylabel("strength")
    axes[2].set_ylabel("agreement with\nthe original (%)")
    axes[2].set_xlabel("step")
    if axes[2].lines:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("normswap fine-tuning")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return png
