"""Property-based fuzz: random DAG networks through every pipeline (see ``tests/fuzz/random_graphs.py``).

The fast profile below runs in CI (derandomized, so deterministic); ``python -m tools.fuzz --minutes N`` runs
the same generator and checks for longer and tabulates the failures.
"""

import random
import signal

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from qpasses.errors import PassError, QPassesError, VerificationError
from tests.fuzz.random_graphs import (
    CAPTURE,
    INTERNAL,
    KNOWN_OPEN,
    NOT_PRESERVED,
    OK,
    PIPELINES,
    REFUSED,
    UNCLEAR,
    Op,
    Spec,
    check,
    error_outcome,
    op_features,
    random_spec,
)

# No shrinking: shrinking examples drawn through a Random ran past hypothesis' 5-minute limit on a failure
# (measured); a failure prints its spec at once, and `python -m tools.fuzz` keeps each class's smallest graph.
FAST = settings(max_examples=50, deadline=None, derandomize=True, print_blob=True, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

specs = st.randoms(use_true_random=False).map(random_spec)


@FAST
@given(specs)
def test_random_network_passes_every_pipeline(spec):
    note(f"reproduce: check({spec!r})")
    failures = [o for o in check(spec) if o.failed]
    assert not failures, "\n".join(f"{o.pipeline}: {o.status}: {o.detail}" for o in failures)


def test_generator_reaches_every_feature():
    """The generator draws every op kind and every known-open feature when nothing is excluded, so the fuzz
    can hit those classes once the KNOWN_OPEN switch is emptied."""
    seen = set().union(*(random_spec(random.Random(seed), exclude=frozenset()).features() for seed in range(300)))
    kinds = {"conv", "bn", "act", "add", "mul", "iadd", "alias", "cat", "pool", "conv_again", "scale", "head"}
    assert kinds | {"shared_producer", "act_under_cat"} | {k for k, v in KNOWN_OPEN.items() if not v.messages} <= seen


def test_generator_leaves_out_excluded_features():
    for seed in range(100):
        assert not random_spec(random.Random(seed), exclude=frozenset({"cat", "iadd"})).features() & {"cat", "iadd"}


def test_inplace_add_on_an_alias_is_a_capture_feature():
    conv = Op("conv", (0,), (("bias", True), ("cout", 4), ("groups", 1), ("k", 1), ("stride", 1)))
    ops = (conv, Op("alias", (1,), (("module", "dropout"),)), Op("iadd", (2, 1)),
           Op("conv_again", (1,), (("conv", 0),)))
    assert "inplace_alias" in op_features(ops[:3], ops[3], channels_last=False)


def test_an_inplace_add_on_an_alias_is_never_captured_silently_wrong():
    # `a += b` on a Dropout's output changes the value it aliases; fx records the add out of place, so the
    # capture ladder goes on to torch.export, which records it as it runs (or, where it cannot, refuses).
    conv = Op("conv", (0,), (("bias", True), ("cout", 4), ("groups", 1), ("k", 1), ("stride", 1)))
    spec = Spec(3, 8, False, (conv, Op("alias", (1,), (("module", "dropout"),)), Op("iadd", (2, 1)),
                              Op("act", (1,), (("fn", "sigmoid"), ("form", "module")))), (4,), seed=1)
    (capture,) = check(spec, pipelines=(), known_open={})
    assert capture.pipeline == CAPTURE and capture.status in (OK, REFUSED), capture
    assert capture.status == REFUSED or capture.sqnr_db >= 60, capture


@pytest.mark.parametrize("exc, status", [
    (QPassesError("conv 'c' has groups=3: use groups=1"), REFUSED),
    (QPassesError("first line\nsecond line"), UNCLEAR),
    (PassError("Lower (pass 4 of 4): internal error KeyError: torch.quint8"), INTERNAL),
    (VerificationError("FuseBN claims to preserve the model's function, but SQNR ... is 3.0 dB"), NOT_PRESERVED),
    (KeyError("torch.quint8"), INTERNAL),
])
def test_errors_are_classified(exc, status):
    assert error_outcome("fusebn", exc).status == status


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_plain_network_passes(pipeline):
    conv = Op("conv", (0,), (("bias", False), ("cout", 6), ("groups", 1), ("k", 3), ("stride", 1)))
    spec = Spec(3, 8, False, (conv, Op("bn", (1,)), Op("act", (2,), (("fn", "relu"), ("form", "module")))), (3,))
    (outcome,) = [o for o in check(spec, pipelines=(pipeline,)) if o.pipeline == pipeline]
    assert outcome.status == OK, outcome.detail


def test_a_constant_output_bounds_nothing():
    # ReLU6 of a negated sigmoid is all zeros: no predicted noise, an exact int8 output (sqnr skips it).
    conv = Op("conv", (0,), (("bias", True), ("cout", 4), ("groups", 1), ("k", 1), ("stride", 1)))
    spec = Spec(3, 8, False, (conv, Op("act", (1,), (("fn", "sigmoid"), ("form", "functional"))),
                              Op("scale", (2,), (("by", -1.0),)), Op("act", (3,), (("fn", "relu6"), ("form", "module")))),
                (4, 2))
    (outcome,) = [o for o in check(spec, pipelines=("ptq_x86",)) if o.pipeline == "ptq_x86"]
    assert outcome.status == OK, outcome.detail


def test_an_add_that_cancels_its_inputs_lowers_on_qnnpack_without_looping():
    """Graph 267 of seed 5: x + (−0.998·x) leaves an output grid 2⁸ finer than its input's; Lower widened it
    to the bound of qnnpack's scale ratio itself, which rounded back onto the bound, for ever."""
    conv = Op("conv", (1,), (("bias", True), ("cout", 5), ("groups", 1), ("k", 3), ("stride", 1)))
    spec = Spec(3, 12, False, (
        Op("conv", (0,), (("bias", False), ("cout", 5), ("groups", 1), ("k", 1), ("stride", 2))), conv,
        Op("scale", (2,), (("by", -0.998),)),
        Op("conv", (3,), (("bias", True), ("cout", 4), ("groups", 1), ("k", 3), ("stride", 1))),
        Op("iadd", (2, 3))), (4, 5), seed=48165)

    def hung(*_):
        raise TimeoutError("Lower did not finish in 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        (outcome,) = check(spec, pipelines=("ptq_qnnpack",), known_open={})[1:]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcome.status == OK, outcome
