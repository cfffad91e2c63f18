"""One contract suite over every registered variant: a new variant is tested with no new test code.

Cases come from the registry (``normswap.variants.names()``) and each variant's ``examples()``; a registered
variant with no examples gets a case that fails, so none slips through. For each example model, in float32 and
(the first example) in float64: the conversion at strength 0 is exact (bit for bit where the README claims
it), dtypes and shapes are kept, ``current_strength()`` follows ``set_strength()``, the model traces with
torch.fx, conversions are deterministic, save -> load is identical; opt-in sites (those converted only when a
target names them) pass the same checks; calibration -> report keeps the start exact, strength 1 then changes the
output wherever a layer stops claiming exactness, and the calibrated file reloads identically; export -> reload
computes the same. ``torch.compile`` runs every variant (aot_eager here, inductor in the slow suite)."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import fx, nn

import normswap
from normswap import variants

OPT_IN = "converted only when a target names it"

# Where the README's variant table claims bit identity at strength 0 (docs/testing.md): the whole model's output
# ("model"), the unfolded sites' outputs ("unfolded sites", ANAct), the folded conv/linear itself ("folded layer",
# PatchNorm). Any other variant is held to a tolerance only.
BIT_EXACT = {"uan": "model", "recenter": "model", "rescale": "model", "anact": "unfolded sites",
             "patchnorm": "folded layer"}


def contract_cases() -> list[tuple[str, int | None, torch.dtype]]:
    """``(variant, example index, dtype)`` for every registered variant: every example in float32, the first also
    in float64; ``(variant, None, float32)`` for a variant without examples, a case that fails."""
    cases: list[tuple[str, int | None, torch.dtype]] = []
    for name in variants.names():
        n = len(variants.get(name).examples())
        cases += [(name, i, torch.float32) for i in range(n)] + ([(name, 0, torch.float64)] if n else [])
        if not n:
            cases.append((name, None, torch.float32))
    return cases


def params(float64: bool = True) -> list:
    """The cases as pytest params with readable ids (``uan-2``, ``uan-0-float64``, ``dummy-NO-EXAMPLES``)."""
    return [pytest.param(name, i, dtype, id=f"{name}-{'NO-EXAMPLES' if i is None else i}"
                         + ("-float64" if dtype == torch.float64 else ""))
            for name, i, dtype in contract_cases() if float64 or dtype == torch.float32]


def example(name: str, i: int | None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    if i is None:
        pytest.fail(f"variant '{name}' provides no examples(): the contract suite cannot test it; return small "
                    "models holding every source kind it accepts (normswap.Variant.examples)", pytrace=False)
    torch.manual_seed(i)
    model, x = variants.get(name).examples()[i]
    if dtype != torch.float32:
        model, x = model.to(dtype), (x.to(dtype) if x.is_floating_point() else x)
    return model.eval(), x


def converted_modules(model: nn.Module, plan: normswap.Plan) -> list[normswap.Variant]:
    return [model.get_submodule(s.name) for s in plan.converted]


def set_all(modules: list[normswap.Variant], strength: float) -> None:
    for m in modules:
        m.set_strength(strength)
        assert m.current_strength() == pytest.approx(strength, rel=1e-6, abs=0), (type(m).__name__, strength)


def run_recorded(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each named module's (input, output) in one forward pass."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    def keep(name: str):
        def hook(_module, args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, (args[0].detach().clone(), out.detach().clone()))
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def assert_bit_exact_claims(name: str, result: normswap.ConvertResult, x: torch.Tensor) -> None:
    """At strength 0, ``torch.equal`` where the README claims bit identity (see BIT_EXACT)."""
    claim, model, original = BIT_EXACT.get(name), result.model, result.original
    with torch.no_grad():
        if claim == "model":
            assert torch.equal(model(x), original(x)), f"{name}: strength 0 is not bit-identical to the original"
        elif claim == "unfolded sites":
            sites = [s.name for s in result.plan.converted if s.facts.get("exact_at") == "strength 0"]
            for site, (inp, out) in run_recorded(model, x, sites).items():
                assert torch.equal(out, original.get_submodule(site)(inp)), f"{name}: unfolded site {site}"
        elif claim == "folded layer":
            sites = [s.name for s in result.plan.converted]
            for site, (inp, out) in run_recorded(model, x, sites).items():
                layer, mine = copy.deepcopy(original.get_submodule(site)), model.get_submodule(site)
                layer.weight, layer.bias = nn.Parameter(mine.weight.detach()), (
                    None if mine.bias is None else nn.Parameter(mine.bias.detach()))
                assert torch.equal(out, layer(inp)), f"{name}: site {site} is not the folded layer bit for bit"


def check_conversion(name: str, model: nn.Module, x: torch.Tensor, tmp: Path, targets=None) -> normswap.ConvertResult:
    """Convert at strength 0 and check everything that needs no data; returns the result (at strength 0)."""
    result = normswap.convert(model, to=name, targets=targets, example_inputs=x)
    assert result.report.ok and result.plan.converted
    converted, modules = result.model, converted_modules(result.model, result.plan)
    assert all(isinstance(m, normswap.Variant) and m.claims_exact() and m.current_strength() == 0.0 for m in modules)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype == x.dtype
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert_bit_exact_claims(name, result, x)
    for m in modules:  # the model's dtype is kept; the strength buffers are float32 by design, whatever the model
        tensors = [t for n, t in [*m.named_parameters(), *m.named_buffers()]
                   if t.is_floating_point() and n.rpartition(".")[2] != getattr(m, "strength_key", "strength")]
        assert all(t.dtype == x.dtype for t in tensors), (name, type(m).__name__, {t.dtype for t in tensors})
    for strength in (0.3, 1.0, 0.0):  # fx-traceable at every strength, and the strength is what was set
        set_all(modules, strength)
        gm = fx.symbolic_trace(converted)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), converted(x), atol=1e-6, rtol=1e-6)
    again = normswap.convert(model, to=name, targets=targets, example_inputs=x).model  # deterministic
    a, b = converted.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    set_all(modules, 1.0)
    path = normswap.save(converted, tmp / "m.safetensors", plan=result.plan, force=True)
    loaded = normswap.load(path, model=model)
    assert [m.current_strength() for m in converted_modules(loaded, result.plan)] == [1.0] * len(modules)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    set_all(modules, 0.0)
    return result


@pytest.mark.parametrize("name, i, dtype", params())
def test_contract(name, i, dtype, tmp_path):
    model, x = example(name, i, dtype)
    check_conversion(name, model, x, tmp_path)
    plan = normswap.plan(model, to=name)
    opt_in = [s.name for s in plan.skipped if s.reason.startswith(OPT_IN)]
    if opt_in:  # sites a target must name (PatchNorm's plain Linear/Conv): the same contract
        result = check_conversion(name, model, x, tmp_path, targets=[s.name for s in plan.converted] + opt_in)
        assert set(opt_in) <= {s.name for s in result.plan.converted}


def _samples(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs like ``x``: its samples repeated, jittered where they are floating point."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % len(x)
    out = x[idx].clone()
    if out.is_floating_point():
        out += 0.3 * out.std() * torch.randn(out.shape, generator=g, dtype=out.dtype)
    return out


@functools.lru_cache(maxsize=None)
def calibrated(name: str, i: int) -> tuple[normswap.ConvertResult, normswap.CalibrationResult, torch.Tensor, Path]:
    """The example converted at strength 0, then calibrated (and reported) on jittered copies of its input."""
    model, x = example(name, i)
    tmp = Path(tempfile.mkdtemp(prefix="normswap-contract-"))
    data = tmp / "data.safetensors"
    save_file({"inputs": _samples(x, 24, seed=i).contiguous()}, str(data))
    result = normswap.convert(model, to=name, example_inputs=x)
    out = normswap.calibrate(result, str(data), calib_samples=16, eval_samples=8, batch_size=4, strengths=[0.0, 1.0])
    return result, out, x, tmp


@pytest.mark.parametrize("name, i, dtype", params(float64=False))
def test_calibration_report_strength_and_reload(name, i, dtype):
    if i is None:
        example(name, i)
    result, out, x, tmp = calibrated(name, i)
    rep, modules = out.report, converted_modules(out.model, out.plan)
    assert [(r.model, r.strength) for r in rep.rows] == [("before calibration", 0.0), ("before calibration", 1.0),
                                                         ("after calibration", 0.0), ("after calibration", 1.0)]
    assert rep.samples == 8 and out.log.samples == 16 and len(rep.sites) == len(modules)
    start = rep.row("after calibration", 0.0)
    assert start.agreement in (1.0, None) and start.rel_error < 1e-6  # None: outputs without a class dimension
    assert all(m.current_strength() == 0.0 and m.claims_exact() for m in modules)  # calibration restored it
    assert_bit_exact_claims(name, result, x)  # still bit for bit after calibration, whatever it wrote
    set_all(modules, 1.0)
    with torch.no_grad():
        ref, full = result.original(x), out.model(x)
    diff = float((full - ref).abs().max())
    if all(m.claims_exact() for m in modules):
        assert diff <= 1e-4 * (1 + float(ref.abs().max())), f"{name}: claims exact at strength 1, off by {diff:.2e}"
    else:  # a layer that no longer claims the original function must compute something else
        assert diff > 1e-3 * float(ref.abs().max()), f"{name}: strength 1 changed nothing ({diff:.2e})"
    path = out.save(tmp / "calibrated.safetensors", force=True)
    loaded = normswap.load(path, model=example(name, i)[0])
    assert {m.current_strength() for m in converted_modules(loaded, out.plan)} == {1.0}
    with torch.no_grad():
        assert torch.equal(loaded(x), full)
    set_all(modules, 0.0)


@pytest.mark.parametrize("name", variants.names())
def test_strength_one_changes_some_example(name):
    """Per variant: after calibration, strength 1 is not the original on at least one example (the homotopy does
    something), and strength 0 is."""
    n = len(variants.get(name).examples())
    changed = []
    for i in range(n):
        result, out, x, _ = calibrated(name, i)
        modules = converted_modules(out.model, out.plan)
        set_all(modules, 1.0)
        with torch.no_grad():
            ref, full = result.original(x), out.model(x)
        changed.append(not torch.allclose(full, ref, atol=1e-4, rtol=1e-4))
        set_all(modules, 0.0)
    assert any(changed), f"variant '{name}': strength 1 reproduces the original on every example"


@pytest.mark.parametrize("name", variants.names())
def test_export_and_reload(name, tmp_path):
    """Export folds what folds for inference and the file reloads to the same function; a variant that folds
    nothing says so in one line."""
    for i in range(len(variants.get(name).examples())):
        result, out, x, _ = calibrated(name, i)
        path = tmp_path / f"e{i}.safetensors"
        try:
            exported = normswap.export(out.model, path, example_inputs=x, force=True)
        except normswap.NormswapError as exc:
            assert str(exc).startswith("nothing to export: no site of this model folds for inference ("), str(exc)
            assert not path.exists()
            continue
        assert exported.folded and exported.max_abs_diff <= exported.tolerance
        loaded = normswap.load(path, model=example(name, i)[0])
        with torch.no_grad():
            assert torch.equal(loaded(x), exported.model(x))
            torch.testing.assert_close(loaded(x), out.model(x), atol=1e-5, rtol=1e-5)


def _compile_or_skip():
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform (torch._dynamo.is_dynamo_supported() is False)")


@pytest.mark.parametrize("name", variants.names())
def test_torch_compile_smoke(name):
    """Dynamo captures the converted model and AOT autograd runs it (backend aot_eager: no C++ build, seconds)."""
    _compile_or_skip()
    model, x = example(name, 0)
    converted = normswap.convert(model, to=name, example_inputs=x, strength=0.5).model
    compiled = torch.compile(copy.deepcopy(converted), backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", variants.names())
def test_torch_compile_inductor(name):
    _compile_or_skip()
    model, x = example(name, 0)
    converted = normswap.convert(model, to=name, example_inputs=x, strength=0.5).model
    compiled = torch.compile(copy.deepcopy(converted))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), atol=1e-5, rtol=1e-5)
