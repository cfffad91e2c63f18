"""The fine-tuning loop: strength schedule, distillation from the original, checkpoints, torchrun/DDP.

One call of :func:`train` runs one model (the converted one, or the control: the original fine-tuned with the
same budget) from its last checkpoint, if any, to the end. Every step sets the strength of every variant module
from the schedule, sets the learning rate, draws the step's batch (a function of the seed, the epoch and the
step, so a resumed run sees exactly the data an uninterrupted one does), distils from the original, and
every ``checkpoint_every`` steps writes the whole state atomically (:mod:`normswap.train.checkpoint`).

BatchNorms that were not converted keep their pretrained running statistics (eval mode) during training; the
variant modules run in training mode (PatchNorm tracks its patch-norm mean, ANAct its statistics).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from normswap.core import dist
from normswap.calibration.runner import run_calibration
from normswap.errors import NormswapError, UsageError
from normswap.core.plan import Plan
from normswap.train.checkpoint import load_state, save_state
from normswap.train.distill import FeatureTap, distill_loss, feature_points, logits_of
from normswap.train.evaluate import Fidelity, fidelity
from normswap.train.schedule import lr_at, stage_starts, strength_at
from normswap.variants import registry
from normswap.variants import CalibrationSettings, Variant, set_strengths

__all__ = ["TrainLog", "final_fidelity", "select_parameters", "steps_per_epoch", "train"]

_BN = nn.modules.batchnorm._BatchNorm
_NORMS = (_BN, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class TrainLog:
    """What one :func:`train` call did: steps, time, the last figures, where its files are."""

    tag: str
    steps: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def select_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``all`` parameters, the ``new`` layers' (variant modules), or ``norms`` (variant and norm modules)."""
    if which == "all":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        kinds = (Variant,) if which == "new" else (Variant, *_NORMS)
        seen: set[int] = set()
        params = []
        for m in model.modules():
            if isinstance(m, kinds):
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    if not params:
        raise NormswapError(f"finetune.trainable: '{which}' selects no trainable parameter in this model "
                            "(set finetune.trainable: all)")
    return params


def steps_per_epoch(split: Any, batch: int, world: int) -> int:
    """Global batches per epoch of ``split``'s training part; a UsageError when there is not even one."""
    per_epoch = len(split.training) // (batch * world)
    if per_epoch < 1:
        raise UsageError(f"the training part has {len(split.training)} items, fewer than one global batch of "
                         f"{batch * world}: raise finetune.train_samples or lower finetune.batch_size")
    return per_epoch


def _optimizer(params: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _train_mode(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, _BN) and not isinstance(m, Variant):
            m.eval()  # pretrained running statistics stay (small fine-tuning batches would corrupt them)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _Metrics:
    """The JSONL metrics log (rank 0 writes); on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, start: int, write: bool) -> None:
        self.path, self.write = path, write
        if write:
            keep = []
            if start and path.is_file():
                keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            path.write_text("".join(ln + "\n" for ln in keep))

    def add(self, row: dict[str, Any]) -> None:
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def _refit(model: nn.Module, plan: Plan, teacher: nn.Module, split: Any, recipe: Any, strength: float,
           rank: int, world: int) -> None:
    """``calibrate.refit: stages``: refit the statistics that depend on the strength (network-order variants,
    PatchNorm's gains) at the new stage's strength, against the original's activations."""
    sites = [s for s in plan.converted if registry.get(s.variant).needs_targets]
    if not sites or strength <= 0:
        return
    cal = recipe.calibrate
    batches = list(split.batches("calibration", cal.batch_size, rank=rank, world_size=world))
    settings = CalibrationSettings(strength=strength, seed=recipe.seed, em_samples=cal.em_samples,
                                   em_init=cal.em_init, em_tol=cal.em_tol)
    run_calibration(model, Plan(variant=plan.variant, sites=sites), batches, reference=teacher, settings=settings)


def train(model: nn.Module, teacher: nn.Module, plan: Plan | None, split: Any, recipe: Any, *, run_dir: Path,
          tag: str, resume: bool, device: torch.device, progress: bool = False,
          on_best: Callable[[nn.Module, dict[str, Any]], None] | None = None) -> TrainLog:
    """Fine-tune ``model`` (the converted model with its ``plan``, or the control with ``plan=None``) by
    distillation from ``teacher`` on ``split``'s training part, as ``recipe`` says (see the module docstring).

    ``on_best(model, figures)`` is called on rank 0 whenever an evaluation at the final strength beats the best
    agreement so far. Returns the :class:`TrainLog`; ``model`` is trained in place."""
    ft, w = recipe.finetune, dist.world()
    batch = ft.batch_size
    per_epoch = steps_per_epoch(split, batch, w.size)
    total = ft.total_steps(per_epoch)
    model.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # the control has no new layers: with trainable new/norms it trains its norm layers (what was replaced)
    which = ft.trainable if plan is not None or ft.trainable == "all" else "norms"
    optimizer = _optimizer(select_parameters(model, which), ft.optimizer)
    scaler = torch.amp.GradScaler("cuda") if ft.precision == "fp16" and device.type == "cuda" else None
    state = run_dir / f"{tag}-state.safetensors"
    log = TrainLog(tag, total_steps=total)
    position: dict[str, Any] = {"step": 0, "best": None}
    if resume and state.is_file():
        position = load_state(state, model=model, optimizer=optimizer, scaler=scaler)
        log.resumed_from = int(position["step"])
    start = int(position["step"])
    log.best = position.get("best")
    metrics = _Metrics(run_dir / f"{tag}-metrics.jsonl", start, w.rank == 0)
    net = model
    if w.active:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    converted = plan is not None
    taps = FeatureTap(model, teacher, feature_points(plan)) if converted and recipe.distill.feature_weight > 0 else None
    refits = set(stage_starts(recipe.strength, total)) if converted and recipe.calibrate.refit == "stages" else set()
    target = float(recipe.strength.to) if converted else None
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=f"fine-tuning ({tag})", unit="step",
               disable=not progress or w.rank != 0, leave=False)
    it = None
    try:
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if it is None or index == 0:
                it = split.train_batches(batch, epoch=epoch, rank=w.rank, world_size=w.size, start=index)
            x, y = next(it)
            s = strength_at(recipe.strength, step, total) if converted else None
            if converted:
                if step in refits and step > 0 and recipe.calibrate.enabled:
                    _refit(model, plan, teacher, split, recipe, s, w.rank, w.size)
                set_strengths(model, s)
            lr = lr_at(ft.lr_schedule, ft.optimizer.lr, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            _train_mode(model)
            x = x.to(device)
            with _autocast(ft.precision, device), (taps.recording() if taps else nullcontext()):
                out = logits_of(net(x))
                with torch.no_grad():
                    ref = logits_of(teacher(x))
            loss, parts = distill_loss(out, ref, y, recipe.distill, taps.pairs() if taps else ())
            if not math.isfinite(parts["loss"]):
                raise NormswapError(f"the loss is not finite at step {step} (strength {s}): lower "
                                    "finetune.optimizer.lr or lengthen the strength ramp")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if ft.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], ft.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            parts = _mean_over_ranks(parts)
            row = {"step": step + 1, "lr": lr, **parts, **({"strength": s} if converted else {})}
            done = step + 1
            if recipe.eval.every and (done % recipe.eval.every == 0 or done == total):
                fig = fidelity(model, teacher, split.batches("evaluation", recipe.eval.batch_size, rank=w.rank,
                                                             world_size=w.size), device)
                row.update({"eval_agreement": fig.agreement, "eval_accuracy": fig.accuracy})
                log.evals.append({"step": done, "strength": s, **fig.to_dict()})
                at_target = not converted or abs(s - target) < 1e-9
                if at_target and (log.best is None or fig.agreement > log.best["agreement"]):
                    log.best = {"step": done, **fig.to_dict()}
                    if on_best is not None and w.rank == 0:
                        on_best(model, log.best)
            metrics.add(row)
            log.last = row
            bar.update(1)
            bar.set_postfix_str(_postfix(row))
            every = recipe.output.checkpoint_every
            if (every and done % every == 0) or done == total:
                _checkpoint(state, model, optimizer, scaler, {"step": done, "best": log.best}, w.rank)
            log.steps += 1
    finally:
        bar.close()
    if converted:
        set_strengths(model, target)
    model.eval()
    log.seconds = time.perf_counter() - began
    return log


def _postfix(row: dict[str, Any]) -> str:
    text = f"loss {row['loss']:.3f}"
    if "strength" in row:
        text += f", strength {row['strength']:.3g}"
    if row.get("eval_agreement") is not None:
        text += f", agree {100 * row['eval_agreement']:.1f}%"
    return text


def _mean_over_ranks(parts: dict[str, float]) -> dict[str, float]:
    w = dist.world()
    if not w.active:
        return parts
    keys = sorted(parts)
    summed = dist.collectives()[0](torch.tensor([parts[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / w.size for k, v in zip(keys, summed.tolist())}


def _checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                position: dict[str, Any], rank: int) -> None:
    if rank == 0:
        save_state(path, model=model, optimizer=optimizer, scaler=scaler, position=position)
    if dist.world().active:
        torch.distributed.barrier()


def final_fidelity(model: nn.Module, teacher: nn.Module, split: Any, recipe: Any, device: torch.device,
                   strength: float | None = None) -> Fidelity:
    """``model`` against ``teacher`` on the evaluation part, at ``strength`` if given (restored after)."""
    w = dist.world()
    saved = {m: m.current_strength() for m in model.modules() if isinstance(m, Variant)}
    try:
        if strength is not None:
            set_strengths(model, strength)
        return fidelity(model, teacher, split.batches("evaluation", recipe.eval.batch_size, rank=w.rank,
                                                      world_size=w.size), device)
    finally:
        set_strengths(model, saved)
