"""Calibration under torch.distributed: two CPU processes (gloo) on disjoint shards end with identical buffers,
and where the statistics are sums (ANAct; PatchNorm's layer-by-layer least squares) with the statistics of one
process on all the data; under torchrun the two ranks end with the same model, which rank 0 alone writes."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

VARIANTS = ("anact", "patchnorm", "uan")


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(8, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return m.eval()


def _calibrated(variant: str, data: str, layerwise: bool = False) -> dict[str, torch.Tensor]:
    import normswap

    strength = 1.0 if variant == "patchnorm" else 0.0
    r = normswap.convert(_model(), to=variant, strength=strength)
    out = normswap.calibrate(r, data, calib_samples=32, batch_size=4, evaluate=False, layerwise=layerwise)
    return {k: v.detach().clone().contiguous() for k, v in out.model.state_dict().items()}


def _worker(rank: int, store: str, data: str, outdir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for variant in VARIANTS:
            save_file(_calibrated(variant, data), os.path.join(outdir, f"{variant}-{rank}.safetensors"))
        save_file(_calibrated("patchnorm", data, layerwise=True), os.path.join(outdir, f"layerwise-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
    from workers import leave

    leave()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(5)
    data = str(tmp / "data.safetensors")
    save_file({"inputs": torch.randn(48, 3, 8, 8, generator=g) * 1.5 + 0.3}, data)
    mp.spawn(_worker, args=(str(tmp / "store"), data, str(tmp)), nprocs=2, join=True)
    return tmp, data


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_processes_end_with_identical_buffers(two_ranks, variant):
    tmp, _ = two_ranks
    a, b = (load_file(str(tmp / f"{variant}-{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    single = _calibrated(variant, two_ranks[1])
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], _model_state(variant)[k])]
    assert changed, "calibration changed nothing"
    if variant == "anact":  # sums over both shards = the sums over all the data
        for key in a:
            if key.endswith("num_batches_tracked"):  # convert's probe batch counts once per rank
                continue
            torch.testing.assert_close(a[key], single[key], rtol=1e-5, atol=1e-6)


def test_patchnorm_layerwise_on_two_processes_is_one_process_on_all_the_data(two_ranks):
    """Layer by layer, PatchNorm's least-squares sums over both shards are the sums over all the data, so the
    gains equal one process's to float rounding. (Streaming network order solves after every step, and a step of
    two ranks sees two batches: its gains differ from one process's by ~1e-3, by design.)"""
    tmp, data = two_ranks
    a, b = (load_file(str(tmp / f"layerwise-{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single = _calibrated("patchnorm", data, layerwise=True)
    start = _model_state("patchnorm")
    gains = [k for k in a if k.endswith("gain")]
    assert gains and all(float((a[k] - start[k]).abs().max()) > 1e-3 for k in gains)  # calibration moved them
    for key in a:
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(a[key], single[key], rtol=1e-5, atol=1e-6)


def _model_state(variant: str) -> dict[str, torch.Tensor]:
    import normswap

    strength = 1.0 if variant == "patchnorm" else 0.0
    return normswap.convert(_model(), to=variant, strength=strength).model.state_dict()


def test_torchrun_cli_writes_once_with_global_counts(tmp_path):
    import socket
    import subprocess

    (tmp_path / "models.py").write_text(
        "import torch\nfrom torch import nn\n\ndef net():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()\n")
    g = torch.Generator().manual_seed(0)
    save_file({"inputs": torch.randn(40, 3, 8, 8, generator=g)}, str(tmp_path / "d.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    normswap_cmd = [sys.executable, "-m", "normswap"]
    subprocess.run([*normswap_cmd, "convert", "models.py:net", "--weights", "none", "--to", "uan", "-o", "m.safetensors"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "each_rank.py").write_text(EACH_RANK)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "each_rank.py", "calibrate", "m.safetensors", "--data", "d.safetensors",
                          "--trust-source", "--calib-samples", "16", "--eval-samples", "8", "--batch-size", "4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("saved m-calibrated.safetensors") == 1  # rank 0 only
    assert "calibration: 16 samples in 4 batches" in res.stdout  # counted over both ranks
    saved, rank0, rank1 = (load_file(str(tmp_path / n)) for n in ("m-calibrated.safetensors", "rank0.safetensors",
                                                                   "rank1.safetensors"))
    assert saved.keys() == rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(saved[k], rank0[k]) for k in saved)
    start = load_file(str(tmp_path / "m.safetensors"))
    assert not torch.equal(saved["1.mix_mean"], start["1.mix_mean"])  # EM ran: the same result on both ranks


# the normswap command line, recording the model each rank calibrated (rank 0 alone writes the output file)
EACH_RANK = """
import sys
import torch.distributed as dist
from safetensors.torch import save_file
import normswap.cli.calibrate as command
from normswap.cli.main import cli

real = command.run_calibration

def recorded(*args, **kwargs):
    result = real(*args, **kwargs)
    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, f"rank{dist.get_rank()}.safetensors")
    return result

command.run_calibration = recorded
cli.main(sys.argv[1:], prog_name="normswap")
"""


def test_the_group_is_torn_down_at_exit(tmp_path, monkeypatch):
    """init_from_env registers the teardown that a torchrun worker runs at exit (left to the C++ destructors, gloo's
    threads sometimes aborted the process after its work was done)."""
    import atexit

    from normswap.core import dist as ndist

    registered, real_init = [], dist.init_process_group
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: registered.append(backend))
    ndist.init_from_env()
    assert registered == ["gloo", ndist._shutdown]
    real_init("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    ndist._shutdown()
    assert not dist.is_initialized()
    ndist._shutdown()  # nothing left: a no-op
