"""What the suite's torch.distributed worker processes (``mp.spawn`` targets) share."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def leave() -> NoReturn:
    """End a worker that has finished and destroyed its process group without interpreter finalization: gloo's
    threads can still be torn down then, and once in many runs that aborted a finished worker ("terminate called
    without an active exception", SIGABRT), which failed its test. Call it after the work, outside any
    ``try``/``finally``, so an error still raises and ``mp.spawn`` reports it with its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
