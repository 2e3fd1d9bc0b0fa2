import copy

import pytest
import torch
from torch import nn

from qpasses import PassError, PassManager, PlanError, TraceError, VerificationError
from qpasses.passes import FuseBN, Pass, PassResult, ReplaceFunctional, Stage
from qpasses.quant.state import properties_of
from tests.nets import TinyUNet, randomize_bn


class NeedsFoldedBN(Pass):
    requires = frozenset({"bn_folded"})
    provides = frozenset({"needs_folded_ran"})
    preserves_function = True

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


class Quantizes(Pass):
    stage = Stage.QUANTIZE
    provides = frozenset({"observed_test"})

    def run(self, gm, ctx):
        return PassResult(gm)


class NeedsObserved(Pass):
    stage = Stage.LOWER
    requires = frozenset({"observed_test"})

    def run(self, gm, ctx):
        return PassResult(gm)


class Spy(Pass):
    ran = 0

    def run(self, gm, ctx):
        Spy.ran += 1
        return PassResult(gm)


def model_and_input():
    torch.manual_seed(0)
    return randomize_bn(TinyUNet()).eval(), torch.randn(1, 3, 16, 16)


def test_missing_prerequisite_with_one_provider_is_inserted_and_explained():
    pm = PassManager([NeedsFoldedBN()])
    plan = pm.plan()
    assert [p.name for p in plan.passes] == ["FuseBN", "NeedsFoldedBN"]
    assert "inserted FuseBN before NeedsFoldedBN" in pm.explain()


def test_order_follows_contracts_and_keeps_user_order_otherwise():
    plan = PassManager([Quantizes(), NeedsFoldedBN(), ReplaceFunctional(), FuseBN()]).plan()
    assert [p.name for p in plan.passes] == ["ReplaceFunctional", "FuseBN", "NeedsFoldedBN", "Quantizes"]
    assert any("moved FuseBN before NeedsFoldedBN" in n for n in plan.notes)
    unconstrained = PassManager([ReplaceFunctional(), FuseBN()]).plan()
    assert [p.name for p in unconstrained.passes] == ["ReplaceFunctional", "FuseBN"]


def test_missing_provider_without_default_fails_before_any_pass_runs():
    Spy.ran = 0
    model, x = model_and_input()
    with pytest.raises(PlanError, match="NeedsObserved requires 'observed_test'.*add Quantizes\\(\\)"):
        PassManager([Spy(), NeedsObserved()]).run(model, x)
    assert Spy.ran == 0


def test_contradictions_are_refused_with_the_passes_named():
    class A(Pass):
        requires = frozenset({"b"})
        provides = frozenset({"a"})

    class B(Pass):
        requires = frozenset({"a"})
        provides = frozenset({"b"})

    with pytest.raises(PlanError, match="contradictory pipeline.*A before B.*B before A|contradictory pipeline.*B before A.*A before B"):
        PassManager([A(), B()]).plan()

    class Early(Pass):  # a float pass that needs what only a quantize-stage pass provides
        requires = frozenset({"observed_test"})

    with pytest.raises(PlanError, match="contradictory"):
        PassManager([Early(), Quantizes()]).plan()


def test_conflicts_and_invalidation_are_refused():
    class Picky(Pass):
        def conflict_with(self, other):
            return "both pick the backend" if isinstance(other, Picky) else None

    with pytest.raises(PlanError, match="Picky and Picky cannot be in one pipeline: both pick the backend"):
        PassManager([Picky(), Picky()]).plan()

    class Unfolds(Pass):
        after = frozenset({"bn_folded"})
        invalidates = frozenset({"bn_folded"})

    with pytest.raises(PlanError, match="NeedsFoldedBN requires 'bn_folded'.*Unfolds invalidates it"):
        PassManager([FuseBN(), Unfolds(), NeedsFoldedBN()]).plan()


def test_non_pass_entry_is_explained():
    with pytest.raises(PlanError, match="FuseBN\\(\\)"):
        PassManager([FuseBN]).plan()


def test_verification_catches_a_pass_that_changes_the_function_and_names_the_node():
    class Breaks(Pass):
        preserves_function = True

        def run(self, gm, ctx):
            with torch.no_grad():
                gm.get_submodule("dec1.0").weight.mul_(1.5)
            return PassResult(gm)

    model, x = model_and_input()
    with pytest.raises(VerificationError) as info:
        PassManager([FuseBN(), Breaks()]).run(model, x)
    err = info.value
    assert err.pass_name == "Breaks" and err.position == 1 and err.previous == ("FuseBN",)
    assert err.node == "dec1_0"
    assert "Breaks (pass 2 of 2, after FuseBN)" in str(err) and "dB < 60 dB" in str(err)


def test_verification_can_be_turned_off():
    class Breaks(Pass):
        preserves_function = True

        def run(self, gm, ctx):
            with torch.no_grad():
                gm.get_submodule("head").bias.add_(1.0)
            return PassResult(gm)

    model, x = model_and_input()
    pm = PassManager([Breaks()], verify=False)
    pm.run(model, x)
    assert pm.report.records[-1].sqnr_db < 60


def test_pass_failure_is_wrapped_with_position_and_reproducer(tmp_path):
    class Crashes(Pass):
        def run(self, gm, ctx):
            raise RuntimeError("boom")

    model, x = model_and_input()
    with pytest.raises(PassError, match=r"Crashes \(pass 2 of 2, after ReplaceFunctional\): internal error RuntimeError: boom"):
        PassManager([ReplaceFunctional(), Crashes()], reproducer_dir=tmp_path).run(model, x)
    saved = torch.load(tmp_path / "before_Crashes.pt", weights_only=False)
    torch.testing.assert_close(saved(x), model(x))
    assert "failed at: Crashes" in (tmp_path / "pipeline.txt").read_text()


def test_broken_graph_fails_verification():
    class Dangling(Pass):
        def run(self, gm, ctx):
            node = next(n for n in gm.graph.nodes if n.op == "call_module")
            node.target = "no.such.module"
            return PassResult(gm)

    model, x = model_and_input()
    with pytest.raises(VerificationError, match="refers to 'no.such.module'"):
        PassManager([Dangling()]).run(model, x)


class ScalesAWeight(Pass):
    """Changes one weight through ``.data`` (no version bump) and does not say whether it changed anything."""

    def run(self, gm, ctx):
        next(m for m in gm.modules() if isinstance(m, nn.Conv2d)).weight.data.mul_(1.5)
        return PassResult(gm)


class RenamesANode(Pass):
    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        node.name = node.name + "_renamed"
        gm.recompile()
        return PassResult(gm)


def test_modified_is_computed_for_a_pass_that_does_not_report_it():
    model, x = model_and_input()
    for changer in (ScalesAWeight(), RenamesANode()):
        pm = PassManager([Spy(), changer, FuseBN(), Spy()])  # the Spies change nothing
        pm.run(model, x)
        modified = [r.modified for r in pm.report.records[1:]]
        assert modified == [False, True, True, False], changer.name


def test_report_counts_and_modified_flag():
    model, x = model_and_input()
    pm = PassManager([ReplaceFunctional(), FuseBN(), Spy()])
    pm.run(model, x)
    records = {r.name: r for r in pm.report.records}
    assert list(records) == ["trace", "ReplaceFunctional", "FuseBN", "Spy"]
    assert records["FuseBN"].stats == {"folded": 4, "lone": 0}
    assert records["FuseBN"].removed == 4 and records["FuseBN"].nodes_after == records["FuseBN"].nodes_before - 4
    assert records["ReplaceFunctional"].stats == {"add": 1, "cat": 1}
    assert records["Spy"].modified is False and records["FuseBN"].modified is True
    assert records["ReplaceFunctional"].sqnr_db == float("inf")
    table = pm.report.table()
    for name in ("FuseBN", "ReplaceFunctional", "folded=4", "SQNR dB"):
        assert name in table


def test_user_model_is_not_mutated_unless_inplace():
    model, x = model_and_input()
    before = copy.deepcopy(model.state_dict())
    gm = PassManager([FuseBN()]).run(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.enc1[1], nn.BatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())

    PassManager([FuseBN()]).run(model, x, inplace=True)
    assert not torch.equal(before["enc1.0.weight"], model.enc1[0].weight)


def test_result_is_a_normal_module(tmp_path):
    model, x = model_and_input()
    gm = PassManager([ReplaceFunctional(), FuseBN()]).run(model, x)
    expected = gm(x)
    path = tmp_path / "model.pt"
    torch.save(gm, path)
    torch.testing.assert_close(torch.load(path, weights_only=False)(x), expected)
    clone = copy.deepcopy(gm)
    clone.load_state_dict(gm.state_dict())
    torch.testing.assert_close(clone(x), expected)
    gm.train()
    assert gm.training
    gm.eval()
    scripted = torch.jit.trace(gm, x)
    torch.testing.assert_close(scripted(x), expected)


def test_properties_carry_over_to_a_second_manager():
    model, x = model_and_input()
    gm = PassManager([FuseBN()]).run(model, x)
    assert "bn_folded" in properties_of(gm)
    assert [p.name for p in PassManager([NeedsFoldedBN()]).plan(gm).passes] == ["NeedsFoldedBN"]
    again = PassManager([NeedsFoldedBN()]).run(gm, x)
    torch.testing.assert_close(again(x), model(x))


def test_dumps_and_snapshots(tmp_path):
    model, x = model_and_input()
    pm = PassManager([ReplaceFunctional(), FuseBN()], dump_dir=tmp_path, snapshots=True)
    pm.run(model, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_traced.py", "00_traced.txt", "01_ReplaceFunctional.py", "01_ReplaceFunctional.txt",
        "02_FuseBN.py", "02_FuseBN.txt",
    ]
    assert [label for label, _ in pm.snapshots] == ["traced", "ReplaceFunctional", "FuseBN"]
    assert any(isinstance(m, nn.BatchNorm2d) for m in pm.snapshots[1][1].modules())
    with pytest.raises(Exception, match="snapshots=True"):
        _ = PassManager([FuseBN()]).snapshots


class AliasedInPlaceAdd(nn.Module):
    """``a += b`` where ``a`` is what an eval-mode Dropout returns: its input, which later code reads too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        a = self.drop(y)
        a += self.conv2(y)
        return a + y


def test_the_capture_is_verified_against_the_eager_model():
    """Before, FuseBN "preserved" the traced graph (inf dB in the report) whose function was not the model's
    (2.5 dB against it): the reference was the traced graph, never compared with the eager model."""
    model = randomize_bn(AliasedInPlaceAdd()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match=r"differs from the eager model .*in-place `a \+= self\.conv2\(y\)`"):
        PassManager([FuseBN()], leaf_modules=[nn.Dropout]).run(model, x)  # a named leaf: no export rung
    PassManager([FuseBN()], verify=False).run(model, x)  # verification off: no check
    pm = PassManager([FuseBN()])  # export captures the in-place add as the model runs it
    fused = pm.run(model, x)
    assert pm.report.capture.method == "export" and "in-place `a += self.conv2(y)`" in pm.report.capture.tried[0]
    torch.testing.assert_close(fused(x.clone()), model(x.clone()), rtol=1e-4, atol=1e-4)


def test_passes_are_measured_against_the_eager_model():
    model = randomize_bn(TinyUNet()).eval()
    pm = PassManager([FuseBN()])
    pm.run(model, torch.randn(1, 3, 16, 16))
    trace_record, fuse_record = pm.report.records
    assert trace_record.name == "trace" and trace_record.sqnr_db == float("inf")  # the capture is exact
    assert fuse_record.sqnr_db > 60
