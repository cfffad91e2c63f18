"""``normswap.finetune``: a recipe in, a model at the paper's layer out.

convert (exact start, verified) -> calibrate -> fine-tune with the strength schedule, distilling from the
original -> evaluate -> save; then, for comparison, the *control*: the original fine-tuned with the same budget,
data and loss. Outputs (docs/finetune.md): the final model (``output.path``, a self-describing ``.safetensors``
file that ``normswap.load`` opens) and a run folder next to it, ``<stem>.run/``, holding the resolved recipe,
the resumable checkpoints, the metrics logs (JSONL), the best model, ``summary.json`` and ``training.png``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from normswap.api import conversion as api
from normswap.core import dist
from normswap.api.calibration import CalibrationConfig, calibrate
from normswap.errors import OutputError, UsageError
from normswap.io import atomic_write, check_output
from normswap.recipe import Recipe, dump_recipe, load_recipe
from normswap.train.loop import TrainLog, final_fidelity, steps_per_epoch, train
from normswap.train.summary import Summary, plot_metrics

__all__ = ["FinetuneResult", "finetune"]

GENERATED = ("photos", "stamps", "synthetic")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the fine-tuned model, where everything went, and the summary."""

    model: nn.Module | None
    recipe: Recipe
    output: Path
    run_dir: Path
    summary: Summary
    logs: dict[str, TrainLog] = field(default_factory=dict)
    dry_run: bool = False

    def render(self) -> str:
        return self.summary.render()

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "run_dir": str(self.run_dir), "dry_run": self.dry_run,
                **self.summary.to_dict()}


def _paths(recipe: Recipe, output: str | os.PathLike | None) -> tuple[Path, Path]:
    out = Path(output if output is not None else recipe.output.path).expanduser()
    if out.suffix != ".safetensors":
        raise UsageError(f"output.path must end in .safetensors, got {out}")
    return out, out.with_name(out.stem + ".run")


def _prepare_run_dir(run_dir: Path, recipe: Recipe, out: Path, force: bool, resume: bool, rank: int,
                     dry_run: bool = False) -> bool:
    """Check the outputs before any work (every rank checks, so all fail alike; rank 0 writes); returns whether
    there is a checkpoint to resume from. A dry run checks the same and writes nothing."""
    text = dump_recipe(recipe)
    saved = run_dir / "recipe.yaml"
    states = sorted(run_dir.glob("*-state.safetensors")) if run_dir.is_dir() else []
    if resume:
        if not states:
            raise UsageError(f"--resume: no checkpoint in {run_dir} (nothing to resume; run without --resume)")
        if saved.is_file() and saved.read_text() != text:
            raise UsageError(f"--resume: the recipe differs from the one the checkpoint in {run_dir} was made with "
                             f"(compare with {saved}); resume with the same recipe, or start over with --force")
        return True
    if not dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)  # a recipe's output folder (out/ ...) is made for it
    if out.parent.is_dir():
        check_output(out, force=force)
    if states and not force:
        raise OutputError(f"{run_dir} holds a previous run's checkpoint: pass --resume to continue it or --force "
                          "to start over")
    if rank == 0 and not dry_run:
        if force and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, lambda tmp: Path(tmp).write_text(text))
    return False


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _open_split(recipe: Recipe, original: nn.Module, source: Any, world: int) -> Any:
    from normswap.data import default_data_spec, open_data

    spec = recipe.data.spec or default_data_spec(original, source)
    if spec is None:
        raise UsageError("data.spec: no default data for this model (the built-in images are for 3-channel image "
                         "classifiers): give one (an image folder, fashion-mnist, a .safetensors file, ...)")
    ft = recipe.finetune
    generated = spec.lower().partition(":")[0] in GENERATED
    train_samples = ft.train_samples or (100 * ft.batch_size * world if generated else 10**9)
    options = {k: v for k, v in (("image_size", recipe.data.image_size), ("mean", recipe.data.mean),
                                 ("std", recipe.data.std)) if v is not None}
    return open_data(spec, original, source, calib_samples=recipe.calibrate.samples, eval_samples=recipe.eval.samples,
                     train_samples=train_samples, seed=recipe.seed, **options)


def finetune(recipe: Recipe | str | os.PathLike, *, overrides: Iterable[str] = (), output: str | os.PathLike | None = None,
             force: bool = False, resume: bool = False, dry_run: bool = False, progress: bool = False,
             model: nn.Module | None = None) -> FinetuneResult:
    """Run a fine-tuning recipe (a :class:`~normswap.recipe.Recipe` or a YAML file; docs/finetune.md).

    Args:
        overrides: ``"dotted.path=value"`` strings applied to a recipe file (``--set``).
        output: the final model's path instead of ``output.path``; the run folder goes next to it.
        force: start over, replacing an existing output and run folder. resume: continue the run whose
            checkpoint is in the run folder (the recipe must be the same).
        dry_run: convert, open the data and report what the run would do, without calibrating or training.
        model: the unconverted architecture with its weights, instead of ``model.source`` (for custom code).

    Example:
        >>> r = normswap.finetune("recipes/fmnist-uan.yaml", output="fmnist-uan.safetensors", force=True)
        >>> print(r.render())            # original vs converted at strength 0 and 1, and the control
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; change the Recipe object itself instead")
    world = dist.init_from_env()
    out, run_dir = _paths(recipe, output)
    has_state = _prepare_run_dir(run_dir, recipe, out, force, resume, world.rank, dry_run)  # same verdict dry
    if world.active:
        torch.distributed.barrier()
    _seed(recipe.seed)
    conv = recipe.convert
    source_model = model if model is not None else recipe.model.source
    result = api.convert(source_model, to=conv.to, targets=conv.targets or None, exclude=conv.exclude or None,
                              options=dict(conv.options), weights=recipe.model.weights, strength=0.0)
    original = result.original if result.original is not None else copy.deepcopy(model)
    split = _open_split(recipe, original, result.source, world.size)
    steps_per_epoch(split, recipe.finetune.batch_size, world.size)  # enough training data: fail before any work
    device = _device()
    summary = Summary(recipe=recipe.to_dict(), data=split.to_dict(), sites=len(result.plan.converted),
                      variant=conv.to, device=str(device), world_size=world.size)
    if dry_run:
        summary.notes.append(f"dry run: {len(result.plan.converted)} site(s) converted and verified exact; "
                             f"{len(split.training)} training items; nothing calibrated or trained")
        return FinetuneResult(result.model, recipe, out, run_dir, summary, dry_run=True)
    control_model = copy.deepcopy(original) if recipe.control else None
    student = result.model
    if recipe.calibrate.enabled and not has_state:
        cal = recipe.calibrate
        config = CalibrationConfig(batch_size=cal.batch_size, seed=recipe.seed, strength=recipe.strength.to or 1.0,
                                   reestimate_bn=cal.reestimate_bn, em_init=cal.em_init, em_samples=cal.em_samples,
                                   em_tol=cal.em_tol)
        calibrate(result, split, config, original=original, evaluate=False, progress=progress)
    summary.add("original", None, final_fidelity(original, original, split, recipe, device))
    if not has_state or not (run_dir / "before.json").is_file():
        before = final_fidelity(student, original, split, recipe, device, strength=recipe.strength.to)
        if world.rank == 0:
            atomic_write(run_dir / "before.json", lambda tmp: Path(tmp).write_text(json.dumps(before.to_dict())))
    summary.add_saved("converted, before fine-tuning", recipe.strength.to, run_dir / "before.json")
    logs = {}
    best_path = run_dir / "best.safetensors"

    def keep_best(m: nn.Module, figures: dict[str, Any]) -> None:
        api.save(m, best_path, plan=result.plan, source=result.source, force=True)

    logs["converted"] = train(student, original, result.plan, split, recipe, run_dir=run_dir, tag="converted",
                              resume=has_state, device=device, progress=progress, on_best=keep_best)
    for s in (0.0, recipe.strength.to):
        summary.add("converted, fine-tuned", s, final_fidelity(student, original, split, recipe, device, strength=s))
    if world.rank == 0:
        api.save(student.to("cpu"), out, plan=result.plan, source=result.source, force=True)
    student.to(device)
    if control_model is not None:
        resume_control = has_state and (run_dir / "control-state.safetensors").is_file()
        _seed(recipe.seed)
        logs["control"] = train(control_model, original, None, split, recipe, run_dir=run_dir, tag="control",
                                resume=resume_control, device=device, progress=progress)
        summary.add("control: original, fine-tuned", None, final_fidelity(control_model, original, split, recipe,
                                                                           device))
    summary.training = {k: {"steps": v.total_steps, "resumed_from": v.resumed_from, "seconds": round(v.seconds, 1),
                            "best": v.best, "last": v.last} for k, v in logs.items()}
    if world.rank == 0:
        summary.write(run_dir / "summary.json")
        if recipe.output.plot:
            plot_metrics(run_dir, run_dir / "training.png")
    return FinetuneResult(student, recipe, out, run_dir, summary, logs)
