"""normswap.core.threads.serial: small work on one torch thread, the thread count restored however the block ends,
nested and overlapping blocks (other Python threads) restoring the count the first one found; and where
conversion uses it (a probe of a few thousand values, normswap.surgery.probes.is_small)."""

from __future__ import annotations

import threading

import pytest
import torch

from normswap.core.probe import ProbeInput
from normswap.core.threads import serial
from normswap.surgery.probes import is_small


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_one_thread_inside_and_the_count_restored_after(two_threads):
    with serial():
        assert torch.get_num_threads() == 1
        with serial():  # nested: still one, and the outer block restores
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="boom"):
        with serial():
            raise ValueError("boom")
    assert torch.get_num_threads() == 2


def test_overlapping_blocks_in_two_python_threads_restore_the_first_count(two_threads):
    """A opens, B opens (it finds 1: torch's count is the process's), A closes, B closes: 2 again, not B's 1."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a() -> None:
        with serial():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with serial():
            b_in.set()
            a_out.wait(5)
            seen["b, after A closed"] = torch.get_num_threads()

    ts = [threading.Thread(target=f) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen == {"b, after A closed": 1}  # B's block is still open
    assert torch.get_num_threads() == 2


def test_the_same_values_on_one_thread():
    """What serial() wraps: element-wise transcendental operations and per-channel reductions of (K, C) tensors
    (large enough for torch to split them over threads) give the same bits."""
    x = torch.rand(3, 40001, dtype=torch.float64) + 0.1  # an odd size: chunks with tails
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outside = (x.log(), x.exp(), x.sqrt(), x.amax(dim=0), x.sum(dim=0), torch.log1p(-x / 2))
        with serial():
            inside = (x.log(), x.exp(), x.sqrt(), x.amax(dim=0), x.sum(dim=0), torch.log1p(-x / 2))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(outside, inside):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape, dtype, small", [
    ((2, 3, 32, 32), torch.float32, True),  # what normswap infers for a conv net
    ((2, 4, 32, 32), torch.float32, True),
    ((1, 3, 16, 16, 8), torch.float32, True),  # a small video
    ((2, 3, 48, 48), torch.float32, False),  # more than 2 x 4 x 32 x 32 values
    ((3, 3, 32, 32), torch.float32, False),  # a third sample
    ((2, 3, 224, 224), torch.float32, False),  # the full probe: threads pay
    ((2, 16), torch.float32, False),  # not an image batch (a transformer's may be large)
    ((2, 3, 32, 32), torch.int64, False),
])
def test_which_probes_run_on_one_thread(shape, dtype, small):
    assert is_small(ProbeInput((torch.zeros(shape, dtype=dtype),), {})) is small
    assert not is_small(None)
    assert not is_small(ProbeInput((torch.zeros(2, 3, 32, 32),), {"mask": torch.zeros(2)}))
