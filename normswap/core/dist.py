"""torch.distributed support for calibration: every rank ends with the same statistics.

Under ``torchrun`` each worker calibrates on its own shard of the data; the variants add their
accumulated statistics over all workers (``CalibrationSettings.reduce``) and take shared starting points
from rank 0 (``CalibrationSettings.broadcast``) before they solve, so the buffers they write are identical
on every rank. Nothing here does anything in a single process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "average_buffers", "collectives", "init_from_env", "total", "world"]


@dataclass(frozen=True)
class World:
    """This process's place in a distributed job (``rank 0 of 1`` when there is none)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current torch.distributed group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env() -> World:
    """Join the job that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    on CUDA. A no-op in a plain process or when a group is already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_shutdown)
    return world()


def _shutdown() -> None:
    """Tear the group down before the interpreter exits: left to the C++ static destructors, gloo's threads were
    destroyed still running now and then, and the process aborted (``terminate called without an active
    exception``, SIGABRT) after its work was done."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # another rank already gone: nothing left to tear down cleanly
            pass


def _sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone().contiguous()
    dist.broadcast(out, src=0)
    return out


def collectives() -> tuple:
    """``(reduce, broadcast)`` for :class:`normswap.variants.base.CalibrationSettings`: ``(None, None)`` in a
    single process."""
    return (_sum, _from_rank0) if world().active else (None, None)


def total(*counts: int) -> tuple[int, ...]:
    """``counts`` summed over all ranks (themselves in a single process)."""
    if not world().active:
        return counts
    return tuple(int(v) for v in _sum(torch.tensor(counts, dtype=torch.float64)).tolist())


@torch.no_grad()
def average_buffers(modules: list[nn.Module]) -> None:
    """Average the floating-point buffers of ``modules`` over all ranks (re-estimated BatchNorm statistics:
    each rank's cumulative average over its equally sized shard)."""
    w = world()
    if not w.active:
        return
    for m in modules:
        for buf in m.buffers(recurse=False):
            if buf.is_floating_point():
                buf.copy_(_sum(buf) / w.size)
