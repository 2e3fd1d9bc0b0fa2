"""The CPU's int8 features, detected at run time: what decides whether the x86 kernels are exact with 8-bit
activations, and what every benchmark writes next to its timings.

fbgemm (the x86 engine's linears, its convs with asymmetric weights or more than 100 groups) picks its
u8×s8 GEMM kernels from the CPU: with AVX-512 VNNI they accumulate ``vpdpbusd`` products straight into int32;
without it (AVX2, AVX-512 without VNNI; fbgemm has no AVX-VNNI kernels) ``vpmaddubsw`` first adds pairs of
products into a saturating int16 (its depthwise kernels do so on every CPU). torch's x86 engine sends the
other convs to oneDNN only on AVX-512 VNNI CPUs; oneDNN, too, saturates without VNNI. So AVX-512 VNNI is the
one feature that makes full-range u8 activations exact (AMX-int8 CPUs have it); which kernels still need 7-bit
inputs is the backend table's business (``qpasses.quant.backends.Backend.saturates``).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from qpasses.errors import InputError

OVERRIDE_ENV = "QPASSES_CPU_INT8"
"""``vnni`` or ``novnni``: decide as if the CPU had (or lacked) AVX-512 VNNI, e.g. to quantize on one machine
for another, or to test both decisions on any machine. The kernels that run are not affected."""

CpuOverride = Literal["vnni", "novnni"]


@dataclass(frozen=True)
class CpuInt8Features:
    """What this CPU offers int8 kernels. Every flag is False on non-x86 machines.

    ``source`` says where the flags come from: torch's probe (``torch.cpu.get_capabilities``), the kernel's
    ``/proc/cpuinfo`` flags, or an override (``QPASSES_CPU_INT8`` or the ``override`` argument).
    """

    model: str
    avx2: bool
    avx512: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx_int8: bool
    source: str

    @property
    def u8s8_accumulates_in_int32(self) -> bool:
        """Whether the x86 engine's u8×s8 kernels (fbgemm and oneDNN) add every product into int32, so that
        full-range 8-bit activations are exact; otherwise pairs of products saturate an int16."""
        return self.avx512_vnni

    def __str__(self) -> str:
        names = ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx_int8")
        found = [name for name in names if getattr(self, name)]
        overridden = f", {self.source}" if "override" in self.source else ""
        return f"{self.model} ({', '.join(found) or 'no AVX2/AVX-512/VNNI/AMX'}{overridden})"


def cpu_int8_features(override: CpuOverride | None = None) -> CpuInt8Features:
    """This CPU's int8 features (detected once per process), with ``override`` (else ``QPASSES_CPU_INT8``,
    read at each call) applied on top: ``vnni`` sets AVX-512 VNNI, ``novnni`` clears VNNI and AMX."""
    where = "argument"
    if override is None:
        override, where = os.environ.get(OVERRIDE_ENV) or None, OVERRIDE_ENV
    detected = _detected()
    if override is None:
        return detected
    source = f"override {where}={override}"
    if override == "vnni":
        return replace(detected, avx512=True, avx512_vnni=True, source=source)
    if override == "novnni":
        return replace(detected, avx512_vnni=False, avx_vnni=False, amx_int8=False, source=source)
    raise InputError(f"{where}={override!r}: the CPU int8 override must be 'vnni' or 'novnni'")


@cache
def _detected() -> CpuInt8Features:
    model = _model_name()
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.14 (cpuinfo's probe)
    if get_capabilities is not None:
        caps = get_capabilities()
        return CpuInt8Features(
            model=model,
            avx2=bool(caps.get("avx2")),
            avx512=bool(caps.get("avx512_f")),
            avx512_vnni=bool(caps.get("avx512_vnni")),
            avx_vnni=bool(caps.get("avx_vnni")),
            amx_int8=bool(caps.get("amx_int8")),
            source="torch.cpu.get_capabilities",
        )
    flags = _cpuinfo_field("flags").split()
    return CpuInt8Features(
        model=model,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        avx512_vnni="avx512_vnni" in flags,
        avx_vnni="avx_vnni" in flags,
        amx_int8="amx_int8" in flags,
        source="/proc/cpuinfo",
    )


def _model_name() -> str:
    """The full marketing name where the kernel gives it (cpuinfo's own name is often shortened)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.M)
    return match.group(1).strip() if match else ""
