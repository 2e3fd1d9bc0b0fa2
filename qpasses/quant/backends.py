"""The backend table: what the int8 kernels of each ``torch.backends.quantized.engine`` accept, and the
default specs that target them.

Every capability below was measured by running ``torch.ao.nn.quantized`` Conv2d / ConvTranspose2d /
Linear modules (``quantized::conv2d``, ``quantized::conv_transpose2d``, ``quantized::linear``) under
each engine of torch 2.14.1 on x86-64; ``tests/quant/test_backends.py`` re-runs the ones the table
relies on. Common to all engines:

- activations must be per tensor ("Expected quantizer->qscheme() == kPerTensorAffine") and ``quint8``
  ("Expected activation data type QUInt8 but got QInt8"), except that onednn's linear also takes
  ``qint8`` activations (its conv does not);
- weights must be ``qint8`` ("expected scalar type QInt8 but found QUInt8");
- conv and linear take per-tensor or per-channel weights along axis 0, symmetric or with non-zero zero
  points (except onednn), with weight value −128 (no narrow range needed) and requantization scales
  above 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from qpasses.cpu import CpuInt8Features, cpu_int8_features
from qpasses.errors import QPassesError
from qpasses.quant.lowering import has_float_output_kernel
from qpasses.quant.ops import op_of
from qpasses.quant.spec import QuantConfig, QuantSpec, int16_pair_sum_overflows


class UnsupportedSpecError(QPassesError):
    """A spec or config asks for something the backend's kernels cannot run."""


_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

ReduceRange = Literal["never", "every_gemm", "saturating_kernels"]


@dataclass(frozen=True)
class Backend:
    """One quantized engine's capabilities and default specs.

    ``engine``: the ``torch.backends.quantized.engine`` whose torch.ao eager kernels ``Lower`` targets; None for a
    preset with no such kernels (a deployment target's runtime only): quantizing for it ends at the reference
    graph (``qpasses.passes.Reference``), and ``Lower`` refuses it.

    ``reduce_range``/``reduce_range_why``: where activations drop a bit (only while an int16 pair sum could
    still overflow, see ``int16_pair_sum_overflows``): ``never``; ``every_gemm``: into every conv and linear on
    every CPU; ``saturating_kernels``: into the convs and linears whose kernels add pairs of u8×s8 products into
    a saturating int16 on the CPU at hand (``saturates``, ``qpasses.cpu.cpu_int8_features``), full 8 bits elsewhere.
    ``onednn_max_groups``: the engine runs a conv in oneDNN on AVX-512 VNNI CPUs only with symmetric weights and
    at most this many groups; a grouped conv past that runs in fbgemm's depthwise/groupwise kernels, which add
    int16 pairs even there. None: every conv runs in the engine's own kernels.
    ``supports_per_channel_weights``: conv/linear weights per output channel (axis 0).
    ``per_channel_conv_transpose_axis``: the weight axis of per-channel transposed convolutions, or None
    where the kernels refuse them.
    ``symmetric_weights_required``: weight zero points must be 0.
    ``symmetric_conv_transpose_wrong``: symmetric-weight transposed convolutions with
    ``in_channels != out_channels`` give wrong results (see ``check_module``).
    ``signed_activation_modules``: module types whose kernels also take ``qint8`` inputs; every other
    kernel needs ``activation_dtype``, so ``check`` (graph-wide) rejects signed activations.
    ``quantized_bias``: conv/linear kernels round the float bias to int32 at scale ``s_in·s_w`` (per output
    channel) before adding it to the integer accumulator (qnnpack); the others add it in float
    (fbgemm: ``acc + b / (s_in·s_w)`` before requantizing). QAT simulates whichever the backend does.
    ``clamp_needs_contiguous``: the quantized clamp kernel (``torch.clamp``, ``hardtanh``, ``relu6``, ``nn.ReLU6``;
    not ``relu``) returns wrong values on channels-last tensors, the layout its convs write (qnnpack, torch
    2.14.1: up to the whole range off, exact once contiguous); lowering makes every such input contiguous.
    ``runtime``: the runtime whose kernels the row describes where they are not torch.ao's engine (``inductor``,
    ``onnxruntime``, ``openvino``, ``executorch``: presets of the ``qpasses.lower`` targets, with ``engine`` None);
    its capabilities are measured on that runtime (``tests/lower``). None: torch.ao's engine itself.
    ``float_output_modules``: for a preset without a torch.ao engine, the conv/linear types whose int8 kernel in
    its runtime also writes float: where nothing reads such a layer's value as int8, the reference graph leaves it
    unquantized (torch.ao engines: ``lowering.has_float_output_kernel``).
    ``post_op``: for a preset whose runtime computes ops after a conv/linear in the same int8 kernel, whether a
    node (read from the conv/linear it is given) runs as that kernel's post-op (``inductor_post_op``); annotation
    then leaves the conv/linear's value unrounded and observes only the post-op's (``qpasses.quant.annotate``).
    ``float_arithmetic``: for a preset whose runtime has no int8 kernel of its own for these FloatFunctional
    methods (``add``, ``mul``, ``cat``), the ones it computes in float: unless one runs as a conv/linear's post-op, annotation
    keeps it float, so its inputs are not rounded for it (PT2E's X86InductorQuantizer leaves them unannotated).
    ``float_reads_unrounded``: the runtime computes every value in float and rounds it only on its way into an int8
    op (a convert_pt2e graph's semantics), so an op that runs float reads a value before its rounding even where
    an int8 op reads the value rounded (the reference graph gives it the value, not the dequantize).
    ``add_scale_ratio``: the range ``[low, high)`` the add kernels (``quantized::add``, ``add_relu``) accept for
    each input's scale divided by the output's, or None (no limit). qnnpack refuses others ("scale ratio must
    be in [2**-14, 2**8) range"), as after a ReLU that never fires (its range, hence scale, is degenerate);
    lowering widens the narrower grid until the ratio is legal.
    """

    name: str
    engine: str | None
    activation: QuantSpec
    weight: QuantSpec
    supports_per_channel_weights: bool
    reduce_range: ReduceRange
    reduce_range_why: str
    onednn_max_groups: int | None = None
    per_channel_conv_transpose_axis: int | None = None
    symmetric_weights_required: bool = False
    symmetric_conv_transpose_wrong: bool = False
    signed_activation_modules: tuple[type[nn.Module], ...] = ()
    activation_dtype: torch.dtype = torch.quint8
    weight_dtype: torch.dtype = torch.qint8
    quantized_bias: bool = False
    clamp_needs_contiguous: bool = False
    add_scale_ratio: tuple[float, float] | None = None
    runtime: str | None = None
    float_output_modules: tuple[type[nn.Module], ...] = ()
    post_op: Callable[[fx.GraphModule, fx.Node, fx.Node], bool] | None = None
    float_arithmetic: tuple[str, ...] = ()
    float_reads_unrounded: bool = False
    notes: str = ""

    def writes_float_output(self, module: nn.Module) -> bool:
        """Whether this backend's int8 kernel for the conv/linear ``module`` can write float: the runtime's
        ``float_output_modules`` for a preset without a torch.ao engine, else the engine's kernels
        (``lowering.has_float_output_kernel``)."""
        if self.engine is None:
            return isinstance(module, self.float_output_modules)
        return has_float_output_kernel(module, self.engine)

    @property
    def available(self) -> bool:
        """Whether this torch build has the engine (a preset without one needs none)."""
        return self.engine is None or self.engine in torch.backends.quantized.supported_engines

    def saturates(self, module: nn.Module, weight: QuantSpec, cpu: CpuInt8Features | None = None) -> bool:
        """Whether the int8 kernel of ``module`` (a conv or linear with ``weight``-spec weights) needs
        ``reduce_range`` inputs on ``cpu`` (None: this machine's): whether it adds pairs of u8×s8 products into a
        saturating int16 there (or the preset treats every kernel so: ``every_gemm``)."""
        if self.reduce_range != "saturating_kernels":
            return self.reduce_range == "every_gemm"
        cpu = cpu if cpu is not None else cpu_int8_features()
        if not cpu.u8s8_accumulates_in_int32:
            return True
        groups = getattr(module, "groups", 1)
        if self.onednn_max_groups is None or groups == 1:
            return False
        return groups > self.onednn_max_groups or not weight.symmetric

    def reduce_range_reason(self, cpu: CpuInt8Features | None = None) -> str:
        """Why ``saturates`` answers as it does on ``cpu`` (None: this machine's), for the report."""
        if self.reduce_range != "saturating_kernels":
            return self.reduce_range_why
        cpu = cpu if cpu is not None else cpu_int8_features()
        if not cpu.u8s8_accumulates_in_int32:
            return (f"this CPU, {cpu}, has no AVX-512 VNNI: {self.name}'s u8×s8 kernels add pairs of products into "
                    "a saturating int16 (2·255·127 > 32767), exact with 7-bit activations")
        grouped = "" if self.onednn_max_groups is None else (
            f", except the grouped convs it runs in fbgemm (more than {self.onednn_max_groups} groups or asymmetric "
            "weights), whose depthwise/groupwise kernels add pairs of products into a saturating int16 on every CPU")
        return (f"this CPU, {cpu}, has AVX-512 VNNI: {self.name}'s u8×s8 kernels add every product into int32, exact "
                f"with 8-bit activations{grouped} (quantize for a CPU without VNNI with QPASSES_CPU_INT8=novnni)")

    def has_saturating_kernels(self, cpu: CpuInt8Features | None = None) -> bool:
        """Whether some conv or linear kernel of this backend needs ``reduce_range`` inputs on ``cpu`` (None: this
        machine's), i.e. ``saturates`` for some module."""
        if self.reduce_range != "saturating_kernels":
            return self.reduce_range == "every_gemm"
        cpu = cpu if cpu is not None else cpu_int8_features()
        return not cpu.u8s8_accumulates_in_int32 or self.onednn_max_groups is not None

    def default_config(
        self, per_channel: bool | None = None, bits: int | None = None, cpu: CpuInt8Features | None = None
    ) -> QuantConfig:
        """The backend's default weight and activation specs, per channel or per tensor as asked
        (None: the backend's default), at ``bits`` bits if given. Activations get ``reduce_range``
        where some kernel needs it on ``cpu`` (None: this machine's; ``has_saturating_kernels``) and the chosen
        grids could overflow an int16 pair sum; annotation keeps it only on the values such a kernel reads
        (``saturates``)."""
        weight = self.weight
        if per_channel is not None:
            if per_channel and not self.supports_per_channel_weights:
                raise UnsupportedSpecError(f"{self.name}: its kernels take per-tensor weights only")
            weight = weight.replace(axis=0 if per_channel else None)
        activation = self.activation.replace(reduce_range=False)
        if bits is not None:
            weight, activation = weight.replace(bits=bits), activation.replace(bits=bits)
        if self.has_saturating_kernels(cpu) and int16_pair_sum_overflows(activation, weight):
            activation = activation.replace(reduce_range=True)
        return QuantConfig(weight=weight, activation=activation)

    def check(self, spec: QuantSpec, role: Literal["weight", "activation"]) -> None:
        """Raise ``UnsupportedSpecError`` if the kernels cannot run ``spec`` as a ``role`` tensor."""
        if role == "activation":
            self._check_activation(spec, allow_signed=False)
        elif role == "weight":
            if spec.dtype != self.weight_dtype:
                raise self._unsupported(
                    spec, "unsigned weights (quint8) are not supported by its kernels", "use signed=True"
                )
            if spec.per_channel and not self.supports_per_channel_weights:
                raise self._unsupported(
                    spec, "per-channel weights are not supported by its kernels", "use axis=None"
                )
            if self.symmetric_weights_required and not spec.symmetric:
                raise self._unsupported(
                    spec,
                    "asymmetric weights are not supported: the kernels require weight zero point 0",
                    "use symmetric=True",
                )
        else:
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")

    def _unsupported(self, spec: QuantSpec, what: str, fix: str) -> UnsupportedSpecError:
        return UnsupportedSpecError(f"{self.name}: {what}; {fix} (spec: {spec})")

    def _check_activation(self, spec: QuantSpec, allow_signed: bool) -> None:
        if spec.dtype != self.activation_dtype and not (allow_signed and spec.dtype == torch.qint8):
            signed = self.activation_dtype == torch.qint8
            raise self._unsupported(
                spec, f"{'un' * signed}signed activations ({str(spec.dtype).removeprefix('torch.')}) are not "
                "supported by its kernels",
                f"use signed={signed}",
            )
        if spec.per_channel:
            raise self._unsupported(
                spec,
                "per-channel activations are not supported: quantized conv/linear inputs must be per tensor",
                "use axis=None",
            )

    def check_config(self, config: QuantConfig) -> None:
        """``check`` every weight and activation spec the config can hand out."""
        for where, pair in config.pairs():
            for role, spec in (("weight", pair.weight), ("activation", pair.activation)):
                try:
                    self.check(spec, role)
                except UnsupportedSpecError as err:
                    raise UnsupportedSpecError(f"{where} {role}: {err}") from None

    def check_module(
        self, module: nn.Module, weight: QuantSpec | None = None, activation: QuantSpec | None = None
    ) -> None:
        """Raise ``UnsupportedSpecError`` if ``module``'s kernel cannot take a ``weight``-spec weight and
        ``activation``-spec input (either may be None: not checked).

        Conv and linear weights are per channel along axis 0. Transposed convolutions store their
        weight as ``(in, out / groups, *kernel)``: per channel they need axis 1 where supported
        (qnnpack), and x86/onednn compute wrong results for symmetric weights when
        ``in_channels != out_channels`` (those weights route to oneDNN on CPUs with VNNI).
        Signed activations pass for ``signed_activation_modules``.
        """
        if activation is not None:
            self._check_activation(
                activation, allow_signed=isinstance(module, self.signed_activation_modules)
            )
        if weight is None:
            return
        self.check(weight, "weight")
        name = type(module).__name__
        if isinstance(module, _CONV_TRANSPOSE):
            if weight.per_channel and self.per_channel_conv_transpose_axis is None:
                raise UnsupportedSpecError(
                    f"{self.name}: per-channel weights of {name} are not supported by its kernels "
                    "('Per Channel Quantization is currently disabled for transposed conv'); use axis=None"
                )
            if weight.per_channel and weight.axis != self.per_channel_conv_transpose_axis:
                raise UnsupportedSpecError(
                    f"{self.name}: per-channel {name} weights must be split along axis "
                    f"{self.per_channel_conv_transpose_axis} (output channels of its (in, out/groups, ...) "
                    f"weight), got axis={weight.axis}"
                )
            if (
                self.symmetric_conv_transpose_wrong
                and weight.symmetric
                and module.in_channels != module.out_channels
            ):
                fix = (
                    "keep it float"
                    if self.symmetric_weights_required
                    else "use symmetric=False (zero points ≠ 0 route it to fbgemm, which is correct)"
                )
                raise UnsupportedSpecError(
                    f"{self.name}: symmetric-weight {name} with in_channels={module.in_channels} != "
                    f"out_channels={module.out_channels} gives wrong results on its oneDNN kernel "
                    f"(torch 2.14.1, measured: SQNR below 0 dB); {fix}"
                )
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if weight.per_channel and weight.axis != 0:
                raise UnsupportedSpecError(
                    f"{self.name}: per-channel {name} weights must be split along axis 0 (output channels), "
                    f"got axis={weight.axis}"
                )


_SATURATING_PAIRS = (
    "Without AVX-512 VNNI (AVX2, AVX-512 alone; fbgemm has no AVX-VNNI kernels) fbgemm's u8×s8 kernels add "
    "pairs of products with vpmaddubsw into a saturating int16: 2·255·127 = 64770 > 32767. Measured with "
    "FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (and AVX512): full-range activations lose ~50% of the output, 7-bit ones are "
    "exact. With AVX-512 VNNI its GEMMs (linears, convs) add each product into int32 (vpdpbusd), exact with "
    "8-bit activations, but its depthwise and groupwise conv kernels still add int16 pairs (measured: 3×3 and "
    "5×5 depthwise convs with 'same' padding lose ~45%)."
)

_X86_WHY = (
    _SATURATING_PAIRS
    + " The x86 engine runs linears and grouped convs of more than 100 groups or asymmetric weights in fbgemm, "
    "the other convs in oneDNN on AVX-512 VNNI CPUs (int32 accumulation, exact), in fbgemm elsewhere. So on a "
    "VNNI CPU x86 takes 8-bit activations except into those grouped convs; without VNNI, 7-bit steps into every "
    "conv and linear. A model is exact on CPUs like the one it was quantized on; QPASSES_CPU_INT8=novnni "
    "quantizes for CPUs without VNNI. The 7-bit grid keeps headroom (codes past the observed range run on to "
    "255, as torch.ao's x86 default does): no clamp of the codes, but codes past 127 (values past the observed "
    "range) can saturate; fbgemm clips them at 127 instead."
)

_FBGEMM_WHY = (
    _SATURATING_PAIRS
    + " The fbgemm preset keeps 7-bit activations clipped at 127 into every conv and linear on every CPU, so its "
    "models are exact on any x86 CPU, at the cost of a clamp per activation (about 5% of ResNet-50's latency)."
)

def inductor_post_op(gm: fx.GraphModule, producer: fx.Node, node: fx.Node) -> bool:
    """Whether inductor's CPU lowering runs ``node`` in the int8 kernel of the conv/linear ``producer``: a
    hardswish after a 2-d conv (``qconv2d_pointwise``'s unary post-ops; clamp-like ones are folded into the range
    anyway), an add or add+ReLU after a 2-d conv or a linear (``qconv2d_pointwise.binary``,
    ``qlinear_pointwise.binary``): the fusions torchao's X86InductorQuantizer annotates."""
    module = gm.get_submodule(producer.target)
    if node.op == "call_method":
        return node.target in ("add", "add_relu") and type(module) in (nn.Conv2d, nn.Linear)
    op = op_of(gm, node)
    return op is not None and op.name == "hardswish" and type(module) is nn.Conv2d


_X86_ACTIVATION = QuantSpec(signed=False, symmetric=False, observer="mse", reduce_range=True, headroom=True)
# The range search weighs errors by their cube: it clips less than the squared error, whose clipping errors (one
# sign) add up in the conv or linear reading them where roundings average out. Measured on the x86 and inductor
# presets (BENCHMARKS.md, coverage: the activation range search); fbgemm (the same kernels, x86's grid clipped at
# 127) follows x86; the others keep the squared error.
_CUBED_ERROR_ACTIVATION = _X86_ACTIVATION.replace(error_power=3.0)
_FBGEMM_ACTIVATION = _CUBED_ERROR_ACTIVATION.replace(headroom=False)
_INDUCTOR_WHY = (
    "inductor's int8 patterns (torchao 0.18) run every conv and linear in oneDNN's qconv/qlinear_pointwise, "
    "depthwise ones included (no fbgemm), and ignore a quantize's [qmin, qmax]: its kernels write the whole u8 "
    "container, so 7-bit grids keep their headroom (codes past the observed range run on to 255). Measured "
    "(torch 2.14.1, torchao 0.18, AMD EPYC with AVX-512 VNNI; a conv, a depthwise conv and a linear with "
    "same-sign weights on non-negative inputs, convert_pt2e graph vs its torch.compile with freezing): full-range "
    "u8 activations exact (145.8 dB); with ONEDNN_MAX_CPU_ISA=AVX2 oneDNN adds pairs of u8×s8 products into a "
    "saturating int16: full-range activations 23.5 dB (errors up to 11% of the output), 7-bit ones exact "
    "(144.3 dB). So 8-bit activations on AVX-512 VNNI CPUs, 7-bit elsewhere, as torchao's "
    "get_default_x86_inductor_quantization_config(reduce_range=...) advises for CPUs without VNNI."
)
_PER_CHANNEL_WEIGHT = QuantSpec(signed=True, symmetric=True, axis=0, observer="mse")
_ONNX_RUNTIME_WHY = (
    "ONNX Runtime's CPU int8 kernels (MLAS: QLinearConv, QGemm, QLinearMatMul; U8S8, per-tensor u8 activations, "
    "per-channel s8 weights) accumulate u8×s8 products in int32 with AVX-512 VNNI (measured exact with full-range "
    "u8 activations on an AMD EPYC with AVX-512 VNNI, depthwise convs included: tests/lower/test_onnx.py); "
    "without VNNI their AVX2/AVX-512 GEMMs add pairs of products into a saturating int16 (vpmaddubsw), which "
    "ONNX Runtime's quantization docs answer with reduce_range. So 8-bit activations on AVX-512 VNNI CPUs, "
    "7-bit steps into every conv and matmul elsewhere (headroom grids: no Clip of the codes in the graph)."
)
_OPENVINO_WHY = (
    "OpenVINO's CPU plugin runs int8 convs and matmuls in oneDNN: int32 accumulation with AVX-512 VNNI (or AMX), "
    "measured exact with full-range u8 activations on an AMD EPYC with AVX-512 VNNI (tests/lower/test_openvino.py); "
    "without VNNI oneDNN adds pairs of u8×s8 products into a saturating int16 (NNCF answers it with 7-bit "
    "weights, its overflow_fix; here the activations drop the bit instead). So 8-bit activations on AVX-512 "
    "VNNI CPUs, 7-bit steps into every conv and matmul elsewhere."
)

_XNNPACK_WHY = (
    "XNNPACK's qs8 kernels are exact with full 8-bit activations: they accumulate in int32, and where its ARM "
    "'mlal' kernels first add two int8 products in int16, narrow-range weights (|w| <= 127) keep 2·128·127 "
    "below 32767 (measured here on x86 only: tests/lower/test_xnnpack.py)."
)

BACKENDS: dict[str, Backend] = {
    "x86": Backend(
        name="x86",
        engine="x86",
        activation=_CUBED_ERROR_ACTIVATION,
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="saturating_kernels",
        reduce_range_why=_X86_WHY,
        onednn_max_groups=100,
        symmetric_conv_transpose_wrong=True,
        notes="Dispatches each conv to oneDNN (symmetric weights, VNNI CPU) or fbgemm (otherwise).",
    ),
    "fbgemm": Backend(
        name="fbgemm",
        engine="fbgemm",
        activation=_FBGEMM_ACTIVATION,
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="every_gemm",
        reduce_range_why=_FBGEMM_WHY,
    ),
    "qnnpack": Backend(
        name="qnnpack",
        engine="qnnpack",
        activation=QuantSpec(signed=False, symmetric=False, observer="mse"),
        # Per tensor, as in mobile deployments; the kernels also take per-channel weights.
        weight=QuantSpec(signed=True, symmetric=True, observer="minmax"),
        supports_per_channel_weights=True,
        reduce_range="never",
        reduce_range_why="qnnpack widens each u8 product before accumulating (no saturating int16 pair "
        "sums): measured exact with full-range activations where fbgemm's AVX2 path saturates.",
        per_channel_conv_transpose_axis=1,
        quantized_bias=True,
        clamp_needs_contiguous=True,
        add_scale_ratio=(2.0**-14, 2.0**8),
    ),
    "onednn": Backend(
        name="onednn",
        engine="onednn",
        activation=QuantSpec(signed=False, symmetric=False, observer="mse"),
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="saturating_kernels",
        reduce_range_why="oneDNN's u8×s8 kernels accumulate in int32 on AVX-512 VNNI CPUs (measured exact with "
        "full-range activations); without VNNI its convs and linears add pairs of products into a saturating int16 "
        "like fbgemm's (measured with ONEDNN_MAX_CPU_ISA=AVX2 and AVX512_CORE: full-range activations lose half "
        "the output; its depthwise convs stay exact, but are treated alike), which torch's onednn default only warns about.",
        symmetric_weights_required=True,
        symmetric_conv_transpose_wrong=True,
        signed_activation_modules=(nn.Linear,),
    ),
    "onnx": Backend(
        name="onnx",
        engine=None,  # ONNX Runtime's kernels only: quantizing for it ends at the reference graph
        activation=_X86_ACTIVATION,
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="saturating_kernels",
        reduce_range_why=_ONNX_RUNTIME_WHY,
        runtime="onnxruntime",
        float_output_modules=(nn.Linear,),  # DQ → Gemm with no Q after runs as QGemm writing float
        notes="QDQ ONNX for ONNX Runtime's int8 kernels (QLinearConv, QGemm, ...): deploy with --target onnx.",
    ),
    "openvino": Backend(
        name="openvino",
        engine=None,  # OpenVINO's kernels only: quantizing for it ends at the reference graph
        activation=_X86_ACTIVATION,
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="saturating_kernels",
        reduce_range_why=_OPENVINO_WHY,
        symmetric_weights_required=True,
        runtime="openvino",
        float_output_modules=(nn.Linear,),
        notes="QDQ ONNX compiled by OpenVINO's CPU plugin (oneDNN int8 convs and matmuls): deploy with "
        "--target openvino. Symmetric weights, as NNCF writes them for OpenVINO.",
    ),
    "inductor": Backend(
        name="inductor",
        # inductor's kernels only: quantizing for it ends at the reference graph. (torch.ao's onednn engine runs
        # the same oneDNN kernels eagerly, except grouped convs past 100 groups, which it hands to fbgemm's
        # depthwise kernels, saturating with these 8-bit activations.)
        engine=None,
        runtime="inductor",
        float_output_modules=(nn.Conv2d, nn.Linear),  # qconv/qlinear_pointwise write fp32 too
        post_op=inductor_post_op,  # qconv2d_pointwise.binary (conv + add (+ ReLU)), hardswish after a conv
        # inductor has no int8 add/mul of its own: rounding their inputs only loses accuracy (BENCHMARKS.md, coverage);
        # its int8 cat (qcat) only concatenates codes of one grid: a cat whose inputs cannot all share its grid runs
        # float and rounds once, at its value, not each input on a grid of its own first (deeplabv3's ASPP
        # branches: BENCHMARKS.md, causes found); annotation keeps the others int8.
        float_arithmetic=("add", "mul", "cat"),
        float_reads_unrounded=True,
        activation=_CUBED_ERROR_ACTIVATION,
        weight=_PER_CHANNEL_WEIGHT,
        supports_per_channel_weights=True,
        reduce_range="saturating_kernels",
        reduce_range_why=_INDUCTOR_WHY,
        symmetric_weights_required=True,
        symmetric_conv_transpose_wrong=True,
        # measured: qlinear_pointwise on s8 codes (every activation of a convert_pt2e-style graph moved to int8)
        # matches the reference exactly; torch.ao's onednn linear takes them too, its conv does not
        signed_activation_modules=(nn.Linear,),
        notes="the grids of torchao's X86InductorQuantizer: torch.compile (inductor, freezing) or AOTInductor "
        "runs every conv and linear in oneDNN (qconv/qlinear_pointwise); deploy with --target inductor. Per-channel "
        "weights only: inductor's int8 patterns take dequantize_per_channel weights.",
    ),
    "xnnpack": Backend(
        name="xnnpack",
        # no torch.ao eager engine: the reference graph is lowered to ExecuTorch's XNNPACK delegate (qpasses.lower)
        engine=None,
        runtime="executorch",
        # XNNPACK's qs8 operators: signed int8 activations, per tensor, any zero point in [-128, 127]
        activation=QuantSpec(signed=True, symmetric=False, observer="mse"),
        # qc8 weights: per output channel, zero point 0 (qpasses.lower.xnnpack refuses others; ExecuTorch would
        # lower them silently wrong); -127..127 like ExecuTorch's XNNPACKQuantizer and TFLite's int8 spec (its
        # ARM "mlal" kernels add two int8 products in int16, which two (-128)·(-128) overflow; x86 cannot show it)
        weight=QuantSpec(signed=True, symmetric=True, axis=0, narrow_range=True, observer="mse"),
        supports_per_channel_weights=True,
        reduce_range="never",
        reduce_range_why=_XNNPACK_WHY,
        symmetric_weights_required=True,
        activation_dtype=torch.qint8,
        notes="ExecuTorch .pte with the XNNPACK delegate (target xnnpack; pip install 'qpasses[executorch]').",
    ),
}


def get_backend(name: str) -> Backend:
    """The table entry for ``name`` (x86, fbgemm, qnnpack, onednn, inductor, onnx, openvino, xnnpack)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise QPassesError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
