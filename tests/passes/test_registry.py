"""Passes by name: the registry behind ``--passes``."""

import pytest
import torch

from qpasses.passes import PTQ, Calibrate, FuseBN, InsertObservers, Lower, Pass
from qpasses.passes.registry import PASSES, PassOptionError, PassOptions, build_pipeline, parse_pipeline


def options(**kw):
    return PassOptions(calibration=lambda: [torch.randn(1, 3, 8, 8)], **kw)


def test_every_registered_pass_builds():
    for name in PASSES:
        (built,) = build_pipeline(name, options())
        assert isinstance(built, Pass), name


def test_names_are_case_and_space_insensitive_and_unknown_names_are_refused():
    assert parse_pipeline(" FuseBN, ptq ,") == ["fusebn", "ptq"]
    with pytest.raises(PassOptionError, match="unknown pass 'clee'; registered passes: fusebn"):
        parse_pipeline("fusebn,clee")
    with pytest.raises(PassOptionError, match="no passes given"):
        parse_pipeline(" , ")


def test_options_reach_the_passes():
    fuse, ptq = build_pipeline("fusebn,ptq", options(backend="qnnpack", bits=6, per_channel=False, num_batches=3))
    assert isinstance(fuse, FuseBN) and isinstance(ptq, PTQ)
    observe, calibrate, lower = ptq.expand()
    assert isinstance(observe, InsertObservers) and observe.backend.name == "qnnpack"
    assert observe.config.weight.bits == 6 and observe.config.activation.bits == 6
    assert not observe.config.weight.per_channel
    assert isinstance(calibrate, Calibrate) and calibrate.num_batches == 3
    assert isinstance(lower, Lower) and lower.backend == "qnnpack"
    (mixed,) = build_pipeline("mixed", options(budget=0.5, num_batches=2))
    assert mixed.budget == 0.5 and mixed.num_batches == 2
    (dynamic,) = build_pipeline("dynamic", options(backend="qnnpack"))
    assert dynamic.backend.name == "qnnpack"


def test_bad_options_are_pass_option_errors():
    with pytest.raises(PassOptionError, match="pass 'ptq' needs calibration data"):
        build_pipeline("ptq", PassOptions())
    with pytest.raises(PassOptionError, match=r"pass 'observe': QuantSpec.bits must be an int in \[2, 8\]"):
        build_pipeline("observe", options(bits=9))
    with pytest.raises(PassOptionError, match="'dynamic' quantizes to 8 bits only, not 4"):
        build_pipeline("dynamic", options(bits=4))


def test_float_pipelines_never_load_calibration_data():
    def no_data():
        raise AssertionError("calibration data loaded for a float pipeline")

    assert len(build_pipeline("fusebn,functional", PassOptions(calibration=no_data))) == 2
