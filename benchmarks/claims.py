"""Section 5, the papers' claims at small scale, several seeds, reported as they come out (docs/methods.md
sections 1.5, 2 and 3): the corrected affine layer against BatchNorm, LayerNorm and plain Linear in a plain-SGD
MLP with a batch-size sweep; PatchNorm convolutions against BN in a small CNN; UAN (K = 3 replacing one BN)
against BN in a shallow CNN; normalised SiLU (ANAct) against SiLU. Every model is trained from scratch on a
subset of Fashion-MNIST's training split and tested on its test split."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

import normswap

from .timing import Bench

HOW = ("Trained from scratch, seeds 0..S-1 (the seed sets the initialisation and the batch order), on the first "
       "N items of a seeded draw from Fashion-MNIST's training split, tested on M items of its test split; "
       "figures are test accuracy, mean and standard deviation over the seeds. Variant layers come from "
       "`normswap.convert` of the plain model at strength 1 (UAN K = 3, calibrated by EM on 512 training items "
       "before training, as the UAN paper clusters first). MLP: 784-W-W-10, ReLU, plain SGD (lr 0.1, no "
       "momentum, no weight decay), E epochs at each batch size; the corrected affine layer replaces all three "
       "Linears. CNNs: the Fashion-MNIST CNN of `examples/fmnist_cnn.py` (its SiLU copy for ANAct), SGD lr 0.05, "
       "momentum 0.9. Verdict: *better* / *worse* when the means differ by more than twice their standard error, "
       "else *same within noise*.")


def _data(n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    from normswap.data import open_data

    split = open_data("fashion-mnist", calib_samples=n_train, eval_samples=n_test, seed=0)

    def collect(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*split.batches(part, 1000))
        return torch.cat(xs), torch.cat(ys)
    return (*collect("calibration"), *collect("evaluation"))


def train_eval(model: nn.Module, data: tuple[torch.Tensor, ...], *, batch: int, epochs: int, lr: float,
               momentum: float, seed: int) -> float:
    """Train with SGD and cross-entropy; return test accuracy."""
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        return float((model(xte).argmax(1) == yte).float().mean())


def _mlp(width: int, norm: str) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        extra = {"BN": [nn.BatchNorm1d(o)], "LN": [nn.LayerNorm(o)]}.get(norm, [])
        return [nn.Linear(i, o), *extra, nn.ReLU()]
    m = nn.Sequential(nn.Flatten(), *block(784, width), *block(width, width), nn.Linear(width, 10))
    if norm == "corrected affine":
        m = normswap.convert(m.eval(), to="patchnorm", targets=["Linear"], strength=1.0,
                             example_inputs=torch.randn(2, 1, 28, 28)).model
    return m


def _cnn(kind: str, calib: Callable[[normswap.ConvertResult], None]) -> nn.Module:
    from examples.fmnist_cnn import build

    m = build()
    if kind in ("SiLU", "ANAct (SiLU)"):
        for i, layer in enumerate(m):
            if isinstance(layer, nn.ReLU):
                m[i] = nn.SiLU()
    x = torch.randn(2, 1, 28, 28)
    if kind == "PatchNorm":
        return normswap.convert(m, to="patchnorm", strength=1.0, example_inputs=x).model
    if kind == "UAN (one BN)":
        r = normswap.convert(m, to="uan", targets=["1"], strength=1.0, options={"k": 3}, example_inputs=x)
        calib(r)
        return r.model
    if kind == "ANAct (SiLU)":
        return normswap.convert(m, to="anact", strength=1.0, example_inputs=x).model
    return m


def verdict(a: list[float], b: list[float]) -> str:
    """``better`` / ``worse`` when mean(a) - mean(b) exceeds twice its standard error, else ``same within noise``."""
    var = lambda v: statistics.variance(v) if len(v) > 1 else 0.0  # noqa: E731
    diff = statistics.mean(a) - statistics.mean(b)
    se = math.sqrt(var(a) / len(a) + var(b) / len(b))
    if diff > 2 * se and diff > 0:
        return "better"
    if diff < -2 * se and diff < 0:
        return "worse"
    return "same within noise"


def _summary(group: str, setting: str, name: str, accs: list[float], **extra: Any) -> dict[str, Any]:
    return {"group": group, "setting": setting, "model": name, "accs": accs, "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, **extra}


def agreement(agrees: bool | None) -> str:
    """How a claim's row reads: the paper's claim held, did not show at this scale, or failed."""
    return {True: "agrees", None: "not shown (within noise)", False: "disagrees"}[agrees]


def _claim(claim: str, ours: str, agrees: bool | None) -> dict[str, Any]:
    return {"claim": claim, "ours": ours, "agrees": agrees}


def run(bench: Bench) -> dict[str, Any]:
    sz = bench.sizes
    seeds = range(int(sz["seeds"]))
    data = _data(int(sz["claim_train"]), int(sz["claim_test"]))
    rows, claims = [], []
    acc: dict[tuple[str, int], list[float]] = {}
    for b in sz["mlp_batches"]:
        for norm in ("Linear", "BN", "LN", "corrected affine"):
            for seed in seeds:
                torch.manual_seed(seed)
                acc.setdefault((norm, b), []).append(train_eval(_mlp(int(sz["mlp_width"]), norm), data, batch=b,
                                                                epochs=int(sz["mlp_epochs"]), lr=0.1, momentum=0.0,
                                                                seed=seed))
            rows.append(_summary("mlp", f"batch {b}", norm, acc[(norm, b)], batch=b))
            bench.log(f"  mlp batch {b} {norm}: {rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f}")
    b0, b1 = sz["mlp_batches"][0], sz["mlp_batches"][-1]
    for other in ("BN", "LN", "Linear"):
        v = verdict(acc[("corrected affine", b0)], acc[(other, b0)])
        claims.append(_claim(f"MLP, plain SGD, batch {b0}: the corrected affine layer matches or beats {other}",
                             f"corrected affine {v} than {other}" if v != "same within noise" else v,
                             v in ("better", "same within noise")))
    drop = {n: statistics.mean(acc[(n, b0)]) - statistics.mean(acc[(n, b1)]) for n in ("Linear", "BN", "LN",
                                                                                        "corrected affine")}
    worst = max(drop["BN"], drop["Linear"])
    claims.append(_claim(f"larger batches hurt the corrected layer more than BN and plain Linear (batch {b0} -> {b1})",
                         "accuracy lost: " + ", ".join(f"{k} {100 * v:.1f} pts" for k, v in drop.items()),
                         drop["corrected affine"] > worst))

    def calib(r: normswap.ConvertResult) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.safetensors")
            save_file({"inputs": data[0][:512].contiguous()}, path)
            normswap.calibrate(r, path, calib_samples=min(512, len(data[0])), evaluate=False, batch_size=128)

    cnn: dict[str, list[float]] = {}
    for kind in ("BN", "PatchNorm", "UAN (one BN)", "SiLU", "ANAct (SiLU)"):
        for seed in seeds:
            torch.manual_seed(seed)
            cnn.setdefault(kind, []).append(train_eval(_cnn(kind, calib), data, batch=int(sz["cnn_batch"]),
                                                       epochs=int(sz["cnn_epochs"]), lr=0.05, momentum=0.9, seed=seed))
        rows.append(_summary("cnn", f"batch {sz['cnn_batch']}", kind, cnn[kind]))
        bench.log(f"  cnn {kind}: {rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f}")
    for claim, a, b, wanted in (("PatchNorm convolutions stand in for BN in a small CNN", "PatchNorm", "BN",
                                 ("better", "same within noise")),
                                ("UAN (K = 3) replacing one BN beats BN in a shallow CNN", "UAN (one BN)", "BN",
                                 ("better",)),
                                ("normalised SiLU (ANAct) beats SiLU", "ANAct (SiLU)", "SiLU", ("better",))):
        v = verdict(cnn[a], cnn[b])
        agrees = True if v in wanted else (None if v == "same within noise" else False)
        claims.append(_claim(claim, f"{a} {v} than {b}" if v != "same within noise" else v, agrees))
    for c in claims:
        bench.log(f"  claim: {c['claim']}: {c['ours']} ({agreement(c['agrees'])})")
    return {"title": "5. The papers' claims at small scale", "how": HOW, "kind": "claims", "rows": rows,
            "claims": claims, "sizes": {k: sz[k] for k in ("seeds", "claim_train", "claim_test", "mlp_batches",
                                                           "mlp_width", "mlp_epochs", "cnn_epochs", "cnn_batch")}}
