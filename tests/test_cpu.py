"""The CPU's int8 features: torch's probe, the /proc/cpuinfo fallback, non-x86 machines, the override."""

import pytest
import torch

import qpasses.cpu as cpu
from qpasses.cpu import OVERRIDE_ENV, cpu_int8_features
from qpasses.errors import InputError


@pytest.fixture
def fresh_detection(monkeypatch):
    """Detection runs again in the test (and again after it), with no override from the environment."""
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    cpu._detected.cache_clear()
    yield
    cpu._detected.cache_clear()


def test_detected_once_and_typed(fresh_detection):
    features = cpu_int8_features()
    assert features is cpu_int8_features()  # cached
    assert isinstance(features.model, str) and features.model
    assert features.u8s8_accumulates_in_int32 == features.avx512_vnni
    assert features.model in str(features)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert features.avx2


def test_cpuinfo_fallback_agrees_with_torchs_probe(fresh_detection, monkeypatch):
    """torch 2.13 has no ``torch.cpu.get_capabilities``: the kernel's flags give the same answer."""
    if not cpu._cpuinfo_field("flags"):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    probed = cpu_int8_features()
    cpu._detected.cache_clear()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    fallback = cpu_int8_features()
    assert fallback.source == "/proc/cpuinfo"
    names = ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx_int8")
    assert [getattr(fallback, n) for n in names] == [getattr(probed, n) for n in names]


def test_a_machine_without_x86_features_reports_none(fresh_detection, monkeypatch):
    """An ARM machine (or a torch without the probe and no /proc/cpuinfo): every flag False, no int32 claim."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(cpu, "_cpuinfo_field", lambda name: "")
    monkeypatch.setattr(cpu.platform, "processor", lambda: "")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    features = cpu_int8_features()
    assert features.model == "aarch64"
    assert not (features.avx2 or features.avx512 or features.avx512_vnni or features.avx_vnni or features.amx_int8)
    assert not features.u8s8_accumulates_in_int32
    assert str(features) == "aarch64 (no AVX2/AVX-512/VNNI/AMX)"


def test_overrides_set_or_clear_vnni(monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    assert cpu_int8_features("vnni").u8s8_accumulates_in_int32
    novnni = cpu_int8_features("novnni")
    assert not (novnni.u8s8_accumulates_in_int32 or novnni.amx_int8 or novnni.avx_vnni)
    assert novnni.model == cpu_int8_features().model
    assert "override argument=novnni" in str(novnni)
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")  # read at each call, not cached
    assert not cpu_int8_features().u8s8_accumulates_in_int32
    assert f"override {OVERRIDE_ENV}=novnni" in str(cpu_int8_features())
    assert cpu_int8_features("vnni").u8s8_accumulates_in_int32  # the argument wins over the environment
    monkeypatch.setenv(OVERRIDE_ENV, "avx512")
    with pytest.raises(InputError, match=f"^{OVERRIDE_ENV}='avx512': the CPU int8 override must be 'vnni' or 'novnni'$"):
        cpu_int8_features()
