"""The site-local exactness proof (normswap/surgery/local.py) and the fast copy (normswap/surgery/copying.py).

Each test that breaks something checks that the break is caught: a site wrong on its own input, a site wrong only
on its second call, a replacement that aliases its input before an in-place op, a change outside the sites (the
site-local argument no longer holds, so the converted model runs end to end and fails there)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import normswap
from normswap.core.probe import ProbeInput
from normswap.errors import VerificationError
from normswap.surgery.apply import apply_checked
from normswap.surgery.copying import Snapshot, copy_model
from normswap.surgery.find import find_graph
from normswap.surgery.verify import verify
from normswap.variants.uan.variant import UAN, UANChannel

from conftest import randomize_bn

_UAN_FORWARD = UANChannel.forward  # the class convert builds for a BatchNorm


def _parts(model: nn.Module, to: str = "uan"):
    plan, graph = find_graph(model, to)
    converted, snapshot = apply_checked(model, plan, graph=graph.graph)
    return plan, graph, converted, snapshot


def _relabel(module: nn.Module, name: str, forward):
    """Give ``module`` a subclass of its class that claims exactness and runs ``forward(self, x)``."""
    base = type(module)
    module.__class__ = type(name, (base,), {"forward": forward, "claims_exact": lambda self: True})


def test_uan_is_proven_site_by_site_without_running_the_converted_model(small_cnn, monkeypatch):
    x = torch.randn(4, 3, 16, 16)
    calls = []

    def counted(self, *args):
        calls.append(1)
        return _UAN_FORWARD(self, *args)

    monkeypatch.setattr(UANChannel, "forward", counted)
    result = normswap.convert(small_cnn, to="uan", example_inputs=x)
    rep = result.report
    assert rep.ok and rep.method == "site-local" and rep.end_to_end_derived and rep.end_to_end == 0.0
    assert [c.max_abs_diff for c in rep.sites] == [0.0, 0.0, 0.0]
    assert len(calls) == 3  # each UAN ran once, on its recorded input: no forward of the converted model
    assert "proven without running the converted model" in rep.render()
    with torch.no_grad():  # and the claim is true
        assert torch.equal(small_cnn.eval()(x), result.model.eval()(x))


def test_a_site_wrong_on_its_input_fails_site_locally(small_cnn):
    x = torch.randn(2, 3, 16, 16)
    plan, graph, converted, snapshot = _parts(small_cnn)
    _relabel(converted.bn, "Off", lambda self, v: _UAN_FORWARD(self, v) + 1e-3)
    rep = verify(small_cnn, converted, plan, ProbeInput((x,)), graph=graph, snapshot=snapshot)
    assert rep.method == "site-local" and not rep.ok and [c.name for c in rep.failures] == ["bn"]
    assert not rep.end_to_end_derived and rep.end_to_end > 1e-4  # not bit-identical: run end to end as well


class Twice(nn.Module):
    """One BatchNorm called at two places (a shared module), on different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.b(torch.relu(self.bn(self.a(x)))))


def test_a_site_called_twice_is_checked_on_every_call():
    torch.manual_seed(0)
    model = randomize_bn(Twice())
    x = torch.randn(2, 3, 8, 8)
    plan, graph, converted, snapshot = _parts(model)
    rep = verify(model, converted, plan, ProbeInput((x,)), graph=graph, snapshot=snapshot)
    assert rep.ok and rep.method == "site-local" and rep.end_to_end_derived
    seen = []

    def second_call_wrong(self, v):
        seen.append(1)
        return _UAN_FORWARD(self, v) + (1e-3 if len(seen) % 2 == 0 else 0.0)

    _relabel(converted.bn, "SecondWrong", second_call_wrong)
    rep = verify(model, converted, plan, ProbeInput((x,)), graph=graph, snapshot=snapshot)
    assert rep.method == "site-local" and not rep.ok and rep.failures[0].name == "bn"
    assert len(seen) == 4  # its two recorded calls, then two more in the end-to-end run (not bit-identical)


class Residual(nn.Module):
    """conv -> BN -> in-place ReLU, plus the conv output again: ``relu_(bn(c)) + c``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        return self.act(self.bn(c)) + c


def test_a_replacement_returning_its_input_before_an_inplace_op_is_not_trusted_locally():
    model = Residual().eval()
    with torch.no_grad():  # the BatchNorm computes the identity, bit for bit
        model.bn.running_var.fill_(1.0 - model.bn.eps)
    x = torch.randn(2, 3, 8, 8)
    plan, graph, converted, snapshot = _parts(model)
    _relabel(converted.bn, "Alias", lambda self, v: v)  # equal output, but the ReLU then writes into c
    rep = verify(model, converted, plan, ProbeInput((x,)), graph=graph, snapshot=snapshot)
    assert rep.method == "forward" and "storage of its input" in rep.local_skipped
    assert rep.sites[0].max_abs_diff == 0.0 and not rep.ok  # the site looks exact; end to end it is not


def test_a_change_outside_the_sites_falls_back_to_the_end_to_end_check(small_cnn, monkeypatch):
    def after_apply(cls, model, site, module):  # a wrong rewrite: the site is exact, its neighbour is changed
        with torch.no_grad():
            model.conv.weight.mul_(1.01)

    monkeypatch.setattr(UAN, "after_apply", classmethod(after_apply))
    with pytest.raises(VerificationError) as err:
        normswap.convert(small_cnn, to="uan", example_inputs=torch.randn(2, 3, 16, 16))
    rep = err.value.report
    assert rep.method == "forward" and "conv.weight" in rep.local_skipped
    assert rep.end_to_end > 1e-3 and [c.name for c in rep.failures] == ["bn", "head.2"]  # downstream of conv


def test_a_neighbour_replaced_falls_back_too(small_cnn, monkeypatch):
    def after_apply(cls, model, site, module):
        model.stem[2] = nn.GELU()

    monkeypatch.setattr(UAN, "after_apply", classmethod(after_apply))
    with pytest.raises(VerificationError) as err:
        normswap.convert(small_cnn, to="uan", example_inputs=torch.randn(2, 3, 16, 16))
    assert err.value.report.method == "forward" and "stem.2" in err.value.report.local_skipped


def test_where_the_argument_does_not_hold_both_models_run(small_cnn, control_flow_net):
    x = torch.randn(2, 3, 16, 16)
    walk = normswap.convert(control_flow_net, to="uan", example_inputs=x)
    assert walk.report.method == "forward" and "module walk" in walk.report.local_skipped
    anact = normswap.convert(small_cnn, to="anact", example_inputs=x)  # exact at its consumers, which it changes
    assert anact.report.ok and anact.report.method == "forward" and anact.report.local_skipped
    half = normswap.convert(small_cnn, to="patchnorm", strength=0.5, example_inputs=x)
    assert half.report.method == "forward" and "claims no exact start" in half.report.local_skipped


class ReadsBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn.bias.view(1, -1, 1, 1)  # a parameter read, not a call


def test_a_site_whose_parameters_the_forward_reads_is_not_checked_locally():
    rep = normswap.convert(randomize_bn(ReadsBias()), to="uan", example_inputs=torch.randn(2, 3, 8, 8)).report
    assert rep.ok and rep.method == "forward" and "reads 'bn.bias' itself" in rep.local_skipped


def test_a_site_with_hooks_of_its_own_is_not_checked_locally(small_cnn):
    small_cnn.bn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # part of the site's function
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(VerificationError) as err:  # the replacement does not inherit the hook
        normswap.convert(small_cnn, to="uan", example_inputs=x)
    assert err.value.report.method == "forward" and "bn's original module has hooks" in err.value.report.local_skipped


def test_folded_pairs_are_compared_inside_the_network(small_cnn):
    x = torch.randn(2, 3, 16, 16)
    rep = normswap.convert(small_cnn, to="patchnorm", example_inputs=x).report
    assert rep.ok and rep.method == "forward" and "folds 'stem.1' into it" in rep.local_skipped
    assert {c.name for c in rep.sites} == {"stem.0", "head.1"} and 0 < rep.end_to_end < 1e-4


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}


def test_the_converted_model_shares_no_storage_and_training_it_leaves_the_original(small_cnn):
    before = copy.deepcopy(small_cnn.state_dict())
    result = normswap.convert(small_cnn, to="uan", example_inputs=torch.randn(2, 3, 16, 16))
    assert not _storages(small_cnn) & _storages(result.model)
    model = result.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 16, 16)).square().mean().backward()
    opt.step()
    assert not torch.equal(model.conv.weight, before["conv.weight"])
    assert all(torch.equal(v, before[k]) for k, v in small_cnn.state_dict().items())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one Parameter under two names
        self.register_buffer("base", torch.arange(8.0))
        self.register_buffer("view", self.base[2:6])  # a buffer viewing another's storage
        self.extra = {"scale": torch.ones(1)}  # a plain attribute holding a tensor
        self.register_buffer("empty", torch.empty(0))


def test_copy_model_is_deepcopy():
    model = Tied()
    model.a.register_forward_hook(lambda m, i, o: None)
    new = copy_model(model)
    assert type(new) is Tied and new.b.weight is new.a.weight and new.a.weight is not model.a.weight
    assert isinstance(new.a.weight, nn.Parameter) and new.a.weight.requires_grad
    assert new.view.untyped_storage().data_ptr() == new.base.untyped_storage().data_ptr()  # still a view
    assert new.view.untyped_storage().data_ptr() != model.base.untyped_storage().data_ptr()
    assert new.extra["scale"] is not model.extra["scale"] and torch.equal(new.extra["scale"], model.extra["scale"])
    assert len(new.a._forward_hooks) == 1 and new.a._forward_hooks is not model.a._forward_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in new.state_dict().items())
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))  # its own __deepcopy__
    gm2 = copy_model(gm)
    x = torch.randn(2, 3)
    assert isinstance(gm2, fx.GraphModule) and torch.equal(gm(x), gm2(x)) and not _storages(gm) & _storages(gm2)


def test_snapshot_sees_replacements_and_inplace_writes(small_cnn):
    snap = Snapshot.of(small_cnn)
    assert snap.unchanged_outside(small_cnn, set()) == []
    with torch.no_grad():
        small_cnn.bn.running_mean.add_(1.0)
    small_cnn.stem[2] = nn.ReLU()
    assert snap.unchanged_outside(small_cnn, set()) == ["bn.running_mean", "stem.2"]
    assert snap.unchanged_outside(small_cnn, {"bn", "stem.2"}) == []


def test_graph_modules_and_inplace_conversion_are_proven_site_by_site(small_cnn):
    x = torch.randn(2, 3, 16, 16)
    gm = fx.symbolic_trace(small_cnn)
    rep = normswap.convert(gm, to="uan", example_inputs=x).report  # copied through GraphModule's own deepcopy
    assert rep.ok and rep.method == "site-local" and rep.end_to_end_derived
    ref = small_cnn(x)
    same = normswap.convert(small_cnn, to="uan", example_inputs=x, inplace=True)  # checked against a copy
    assert same.model is small_cnn and same.report.method == "site-local" and same.report.end_to_end_derived
    assert torch.equal(small_cnn(x), ref)
