"""Calibration under torch.distributed: two CPU processes (gloo) on disjoint shards end with identical buffers,
and for sum-based statistics (ANAct) with exactly the statistics of one process on all the data."""

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


def _calibrated(variant: str, data: str) -> dict[str, torch.Tensor]:
    import normswap

    strength = 1.0 if variant == "patchnorm" else 0.0
    r = normswap.convert(_model(), to=variant, strength=strength)
    out = normswap.calibrate(r, data, calib_samples=32, batch_size=4, evaluate=False)
    return {k: v.detach().clone().contiguous() for k, v in out.model.state_dict().items()}


def _worker(rank: int, store: str, data: str, outdir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for variant in VARIANTS:
            save_file(_calibrated(variant, data), os.path.join(outdir, f"{variant}-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


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
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "normswap", "calibrate", "m.safetensors", "--data", "d.safetensors",
                          "--trust-source", "--calib-samples", "16", "--eval-samples", "8", "--batch-size", "4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("saved m-calibrated.safetensors") == 1  # rank 0 only
    assert "calibration: 16 samples in 4 batches" in res.stdout  # counted over both ranks
    assert (tmp_path / "m-calibrated.safetensors").is_file()
