"""Small work on one thread: torch's intra-op threads cost more than they save on small tensors.

Each torch CPU operation that torch decides to split across its intra-op threads opens an OpenMP parallel region,
and under ``OMP_WAIT_POLICY=PASSIVE`` (what docs/speed.md recommends on a shared machine: idle threads sleep
instead of spinning) opening one wakes a sleeping thread. Measured on a 2-core VM (torch 2.13, 2 threads,
docs/speed.md "Seventh pass"): ``log``, ``exp`` and ``sqrt`` of a 1024-value float64 tensor take 45-80 us each
with 2 threads and 1.5-3 us with one (torch splits these transcendental operations from about 128 values up),
and any operation on 32k values or more pays the same wake-up. Bookkeeping on per-channel vectors, random draws of
a thousand values, or a forward of a tiny probe batch is made of such operations, so :func:`serial` runs it on
one thread. What is computed does not change: inside a block each caller runs element-wise operations and
per-channel or per-row reductions, whose values do not depend on the thread count, or (verification's forwards of
a small probe) compares two models that both run inside it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["serial"]

_lock = threading.Lock()
_depth = 0  # open serial() blocks, over all Python threads
_saved = 1  # the thread count the outermost one found


@contextmanager
def serial() -> Iterator[None]:
    """Run the enclosed torch operations on one intra-op thread, then restore the thread count (also on an
    exception). Use it only around work made of small operations (module docstring): a large convolution or matrix
    product inside it would lose its parallel speed-up.

    torch's thread count is the process's, not the calling thread's: while a block is open, torch work in other
    Python threads runs on one thread too. Blocks nest and may overlap across threads: the count found by the first
    to open is restored when the last one closes. It costs about 0.2 us."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            if _saved > 1:
                torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved > 1:
                torch.set_num_threads(_saved)
