"""Random DAG networks and the checks every qpasses pipeline must pass on them.

Shared by the fast property test (``tests/fuzz/test_random_graphs.py``, hypothesis drives the generator) and
the long run (``python -m tools.fuzz --minutes N``, a seeded ``random.Random`` drives it). A network is a
``Spec``: a printable, ``eval``-able list of ops, so any failure is reproduced with
``check(Spec(...))`` or ``RandomGraph(Spec(...))``.

Properties checked on each pipeline (``PIPELINES``):
(a) it succeeds or raises a one-line ``QPassesError`` that is not an internal error;
(b) function-preserving pipelines (FuseBN, FuseBN+CLE) stay ≥ ``PRESERVE_DB`` against the eager model;
(c) quantized pipelines (PTQ x86/qnnpack, QAT → convert) stay above ``sqnr_floor`` against the eager model;
(d) so does the reference quantized graph the lowered model keeps (``state_of(model).reference``), run in float.
The capture itself (``qpasses.trace``) is checked against the eager model first (``CAPTURE``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.errors import QPassesError, VerificationError
from qpasses.passes import CLE, PTQ, QAT, FuseBN
from qpasses.quant.state import existing_state
from tests.nets import randomize_bn


@dataclass(frozen=True)
class KnownOpen:
    """A failure class being fixed on another branch. ``pipelines``: where it is open (None: everywhere,
    capture included). ``messages``: error texts that identify it, for a class that raises; without them,
    its name is a feature of the graphs (``Spec.features``) that triggers it."""

    pipelines: frozenset[str] | None = None
    messages: tuple[str, ...] = ()


# TEMPORARY (empty it once the fixes are merged): the generator leaves out the features open everywhere;
# `check` skips a pipeline that a feature of the graph is open on, and classifies a known message as known.
KNOWN_OPEN: dict[str, KnownOpen] = {}

MAX_OPS = 12
CHANNELS = (4, 5, 6, 8)
SIZES = (8, 10, 12)
BATCH = 4
PRESERVE_DB = 60.0

CLAMP_ACTS = ("relu", "relu6", "hardtanh")  # bounded below/above: fold into the producer's output range
ACTS = (*CLAMP_ACTS, "leaky_relu", "sigmoid", "hardswish", "tanh")


@dataclass(frozen=True)
class Op:
    """One op of a ``Spec``: ``kind``, the indices of the values it reads (0 is the input, op ``i`` writes
    value ``i + 1``) and its parameters (a sorted tuple of pairs, so the op is hashable and prints as code)."""

    kind: str
    inputs: tuple[int, ...]
    params: tuple[tuple[str, object], ...] = ()

    def get(self, name: str, default: object = None) -> object:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class Spec:
    """A random network: input channels and size, memory format, ops, and the values it returns."""

    in_channels: int
    size: int
    channels_last: bool
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    seed: int = 0  # weights, BN statistics, inputs

    def readers(self) -> list[int]:
        """How many ops (and outputs) read each value."""
        return [sum(v in op.inputs for op in self.ops) + (v in self.outputs) for v in range(len(self.ops) + 1)]

    def features(self) -> set[str]:
        """The op kinds and features (``op_features``) of the network, for ``KNOWN_OPEN`` and the summary."""
        found = set().union(*(op_features(self.ops[:i], op, self.channels_last) for i, op in enumerate(self.ops)))
        if any(_stale(self.ops, v) for v in self.outputs):
            found.add("inplace_alias")
        readers = self.readers()
        if any(op.kind == "act" and op.get("fn") in ("relu6", "hardtanh") and readers[op.inputs[0]] > 1
               for op in self.ops):
            found.add("qnnpack_clamp")  # a producer read elsewhere too keeps its own range: the clamp is an op
        return found


def _producer(ops: tuple[Op, ...], value: int) -> Op | None:
    return ops[value - 1] if value > 0 else None


def _root(ops: tuple[Op, ...], value: int) -> int:
    """The value whose tensor ``value`` is: through eval-mode Dropout/Identity and ``a += b`` (both return
    the tensor they read)."""
    while (op := _producer(ops, value)) is not None and op.kind in ("alias", "iadd"):
        value = op.inputs[0]
    return value


def _stale(ops: tuple[Op, ...], value: int) -> bool:
    """Whether ``value``'s tensor was changed in place after ``value`` was written: eager reads the new
    contents, the captured graph (fx records ``a += b`` as ``a + b``) the old ones."""
    return any(o.kind == "iadd" and j + 1 > value and _root(ops, o.inputs[0]) == _root(ops, value)
               for j, o in enumerate(ops))


def op_features(ops: tuple[Op, ...], op: Op, channels_last: bool) -> set[str]:
    """The features (keys of ``KNOWN_OPEN`` and a few more, for the summary) ``op`` adds after ``ops``."""
    found = {op.kind}
    if op.kind == "cat":
        for v in op.inputs:
            p = _producer(ops, _root(ops, v))
            if p is not None and p.kind == "cat":
                found.add("nested_cat")
            if p is not None and p.kind == "act":
                found.add("act_under_cat")
                if p.get("fn") in CLAMP_ACTS:
                    found.add("clamp_act_under_cat")
    if op.kind == "act":
        if op.get("fn") == "leaky_relu" and op.get("form") == "functional":
            found.add("leaky_relu_kwargs")
        producer = _producer(ops, op.inputs[0])
        if op.get("fn") in ("relu6", "hardtanh") and (channels_last or producer is None
                                                       or producer.kind not in ("conv", "conv_again", "bn")):
            found.add("qnnpack_clamp")  # qnnpack's convs write channels-last data: only a clamp folded
            # into its producer's range is safe
    if any(_stale(ops, v) for v in op.inputs):
        found.add("inplace_alias")
    if op.kind == "conv_again":
        found.add("module_twice")
    if op.kind in ("add", "iadd"):
        found.add("add")
    if sum(op.inputs.count(v) for v in op.inputs) > len(op.inputs) or any(
            v in o.inputs for v in op.inputs for o in ops):
        found.add("shared_producer")
    return found


# --- generation ------------------------------------------------------------------------------------------------

def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def random_spec(rng: random.Random, exclude: frozenset[str] | None = None) -> Spec:
    """A random network of 2 to ``MAX_OPS`` ops, leaving out the features in ``exclude`` (default: those
    ``KNOWN_OPEN`` on every pipeline)."""
    if exclude is None:
        exclude = frozenset(name for name, known in KNOWN_OPEN.items() if known.pipelines is None)
    in_channels, size = rng.choice((3, 4)), rng.choice(SIZES)
    channels_last = rng.random() < 0.3
    shapes = [(in_channels, size)]  # (channels, spatial size) of each value
    ops: list[Op] = []
    consumers = [0]
    n_ops = rng.randint(2, MAX_OPS)
    while len(ops) < n_ops:
        op = _random_op(rng, tuple(ops), shapes, consumers, first=not ops)
        if op is None or op_features(tuple(ops), op, channels_last) & exclude:
            continue
        ops.append(op)
        shapes.append(_shape(tuple(ops), shapes, op))
        consumers.append(0)
        for v in op.inputs:
            consumers[v] += 1
    if rng.random() < 0.3:
        ops.append(Op("head", (len(ops),), (("features", 5),)))
        outputs: tuple[int, ...] = (len(ops),)
    else:
        leaves = [v for v in range(1, len(ops) + 1)
                  if consumers[v] == 0 and not ("inplace_alias" in exclude and _stale(tuple(ops), v))]
        outputs = tuple(leaves[-2:]) or (len(ops),)
    return Spec(in_channels, size, channels_last, tuple(ops), outputs, seed=rng.randrange(2**16))


def _shape(ops: tuple[Op, ...], shapes: list[tuple[int, int]], op: Op) -> tuple[int, int]:
    c, s = shapes[op.inputs[0]]
    if op.kind == "conv":
        return int(op.get("cout")), _conv_out(s, int(op.get("k")), int(op.get("stride")))
    if op.kind == "conv_again":
        conv = ops[int(op.get("conv"))]
        return int(conv.get("cout")), _conv_out(s, int(conv.get("k")), int(conv.get("stride")))
    if op.kind == "cat":
        return sum(shapes[v][0] for v in op.inputs), s
    if op.kind == "pool":
        k, stride = int(op.get("k")), int(op.get("stride"))
        return c, (s + 2 * (k // 2) - k) // stride + 1 if k == 3 else s // 2
    return c, s


def _random_op(rng: random.Random, ops: tuple[Op, ...], shapes: list[tuple[int, int]], consumers: list[int],
               first: bool) -> Op | None:
    values = list(range(len(shapes)))
    # Prefer recent values no op reads yet, so the graph stays connected; any value may be shared.
    unread = [v for v in values if consumers[v] == 0 and v > 0]

    def pick(candidates: list[int]) -> int:
        fresh = [v for v in candidates if v in unread]
        return rng.choice(fresh if fresh and rng.random() < 0.7 else candidates)

    if first:
        kind = "conv"
    else:
        kind = rng.choices(
            ("conv", "bn", "act", "add", "mul", "iadd", "alias", "cat", "pool", "conv_again", "scale"),
            weights=(5, 3, 5, 3, 1, 1, 1, 3, 1, 1, 1))[0]
    v = pick(values[1:] if not first else [0])
    c, s = shapes[v]
    if kind == "conv":
        cout = rng.choice(CHANNELS)
        k = rng.choice((1, 3))
        stride = 2 if s >= 8 and rng.random() < 0.2 else 1
        groups = 1
        r = rng.random()
        if r < 0.2:
            cout, groups = c, c  # depthwise
        elif r < 0.35 and math.gcd(c, cout) > 1:
            groups = math.gcd(c, cout)
        return Op("conv", (v,), (("bias", rng.random() < 0.5), ("cout", cout), ("groups", groups), ("k", k),
                                 ("stride", stride)))
    if kind == "bn":
        convs = [u for u in values[1:] if ops[u - 1].kind in ("conv", "conv_again")]
        v = pick(convs) if convs and rng.random() < 0.8 else v
        return Op("bn", (v,))
    if kind == "act":
        fn = rng.choice(ACTS)
        params: list[tuple[str, object]] = [("fn", fn), ("form", rng.choice(("module", "functional")))]
        if fn == "hardtanh":
            params.append(("max_val", rng.choice((1.0, 2.0, 6.0))))
            params.append(("min_val", rng.choice((-1.0, 0.0))))
        if fn == "leaky_relu":
            params.append(("negative_slope", rng.choice((0.1, 0.2))))
        return Op("act", (v,), tuple(sorted(params)))
    if kind in ("add", "mul", "iadd"):
        same = [u for u in values[1:] if shapes[u] == (c, s)]
        if kind == "iadd":
            # Never write into the input (the caller's tensor) or an alias of it, nor into a value itself.
            targets = [u for u in same if _root(ops, u) != 0]
            if not targets:
                return None
            v = rng.choice(targets)
            others = [u for u in same if u != v]
            if not others:
                return None
            return Op("iadd", (v, rng.choice(others)))
        return Op(kind, (v, pick(same)))
    if kind == "scale":  # a layer scale; near -1, an add of it and its input cancels most of the signal
        return Op("scale", (v,), (("by", rng.choice((0.5, 3.0, -0.9, -0.998))),))
    if kind == "alias":
        return Op("alias", (v,), (("module", rng.choice(("dropout", "identity"))),))
    if kind == "cat":
        same = [u for u in values[1:] if shapes[u][1] == s]
        others = rng.sample(same, min(len(same), rng.randint(1, 2)))
        return Op("cat", (v, *others))
    if kind == "pool":
        if s < 4:
            return None
        k = rng.choice((2, 3))
        return Op("pool", (v,), (("fn", rng.choice(("max", "avg"))), ("form", rng.choice(("module", "functional"))),
                                 ("k", k), ("stride", 2 if k == 2 else rng.choice((1, 2)))))
    if kind == "conv_again":
        reusable = [(i, u) for i, o in enumerate(ops) if o.kind == "conv" and int(o.get("groups")) == 1
                    for u in values[1:] if shapes[u][0] == shapes[o.inputs[0]][0] and u != o.inputs[0]]
        if not reusable:
            return None
        i, u = rng.choice(reusable)
        return Op("conv_again", (u,), (("conv", i),))
    raise AssertionError(kind)


# --- the network ----------------------------------------------------------------------------------------------

_ACT_MODULES: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish, "tanh": nn.Tanh,
}
_ACT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid, "hardswish": F.hardswish, "tanh": torch.tanh,
}


class RandomGraph(nn.Module):
    """The eager network of a ``Spec`` (eval mode, BN with random statistics). ``repr`` is the spec."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        channels = [spec.in_channels]
        self.layers = nn.ModuleDict()
        for i, op in enumerate(spec.ops):
            c = channels[op.inputs[0]]
            module: nn.Module | None = None
            if op.kind == "conv":
                k = int(op.get("k"))
                module = nn.Conv2d(c, int(op.get("cout")), k, int(op.get("stride")), k // 2,
                                   groups=int(op.get("groups")), bias=bool(op.get("bias")))
                c = int(op.get("cout"))
            elif op.kind == "conv_again":
                c = int(spec.ops[int(op.get("conv"))].get("cout"))
            elif op.kind == "bn":
                module = nn.BatchNorm2d(c)
            elif op.kind == "act" and op.get("form") == "module":
                module = _ACT_MODULES[str(op.get("fn"))](**_act_kwargs(op))
            elif op.kind == "alias":
                module = nn.Dropout(0.5) if op.get("module") == "dropout" else nn.Identity()
            elif op.kind == "pool" and op.get("form") == "module":
                cls = nn.MaxPool2d if op.get("fn") == "max" else nn.AvgPool2d
                module = cls(**_pool_kwargs(op))
            elif op.kind == "cat":
                c = sum(channels[v] for v in op.inputs)
            elif op.kind == "head":
                module = nn.Linear(c, int(op.get("features")))
                c = int(op.get("features"))
            if module is not None:
                self.layers[f"op{i}"] = module
            channels.append(c)
        randomize_bn(self, seed=spec.seed)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = self.values(x)
        outputs = tuple(values[v] for v in self.spec.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every value of the spec, the input first (a value changed in place later holds its final contents)."""
        values = [x]
        for i, op in enumerate(self.spec.ops):
            args = [values[v] for v in op.inputs]
            name = f"op{i}"
            if op.kind in ("conv", "bn", "alias") or (op.kind in ("act", "pool") and op.get("form") == "module"):
                out = self.layers[name](args[0])
            elif op.kind == "conv_again":
                out = self.layers[f"op{op.get('conv')}"](args[0])
            elif op.kind == "act":
                out = _ACT_FUNCTIONS[str(op.get("fn"))](args[0], **_act_kwargs(op))
            elif op.kind == "pool":
                pool = F.max_pool2d if op.get("fn") == "max" else F.avg_pool2d
                out = pool(args[0], **_pool_kwargs(op))
            elif op.kind == "add":
                out = args[0] + args[1]
            elif op.kind == "mul":
                out = args[0] * args[1]
            elif op.kind == "scale":
                out = args[0] * float(op.get("by"))
            elif op.kind == "iadd":
                out = args[0]
                out += args[1]
            elif op.kind == "cat":
                out = torch.cat(args, dim=1)
            elif op.kind == "head":
                out = self.layers[name](F.adaptive_avg_pool2d(args[0], 1).flatten(1))
            else:
                raise AssertionError(op.kind)
            values.append(out)
        return values

    def __repr__(self) -> str:
        return f"RandomGraph({self.spec!r})"


def _act_kwargs(op: Op) -> dict[str, object]:
    return {k: v for k, v in op.params if k in ("min_val", "max_val", "negative_slope")}


def _pool_kwargs(op: Op) -> dict[str, int]:
    k = int(op.get("k"))
    return {"kernel_size": k, "stride": int(op.get("stride")), "padding": k // 2 if k == 3 else 0}


def example_input(spec: Spec) -> torch.Tensor:
    """The one batch used for calibration and evaluation (the same data: range clipping must not dominate)."""
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(BATCH, spec.in_channels, spec.size, spec.size, generator=g)
    return x.to(memory_format=torch.channels_last) if spec.channels_last else x


# --- checks ---------------------------------------------------------------------------------------------------

CAPTURE = "capture"
PIPELINES = ("fusebn", "fusebn_cle", "ptq_x86", "ptq_qnnpack", "qat_x86")
PRESERVING = ("fusebn", "fusebn_cle")

# Outcome classes. OK and REFUSED (a one-line QPassesError) satisfy the properties; SKIPPED is a known-open
# feature on that pipeline; the rest are failures.
OK, REFUSED, SKIPPED = "ok", "refused", "skipped (known open)"
INTERNAL, UNCLEAR, CAPTURE_MISMATCH = "internal error", "unclear error", "capture mismatch"
NOT_PRESERVED, BELOW_FLOOR = "function not preserved", "quantized SQNR below floor"
REFERENCE_BELOW_FLOOR = "reference graph SQNR below floor"
FAILURES = (INTERNAL, UNCLEAR, CAPTURE_MISMATCH, NOT_PRESERVED, BELOW_FLOOR, REFERENCE_BELOW_FLOOR)


@dataclass
class Outcome:
    pipeline: str
    status: str
    detail: str = ""  # the error's type and message, or the measured and required SQNR
    sqnr_db: float | None = None
    floor_db: float | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


# Per-op error budget. A value quantized on a grid of step Δ = range / (2^b − 1) gets noise Δ²/12. Relative
# to the value's power P that is ε = range² / (12·(2^b − 1)²·P): 10·log10(12·(2^b − 1)²/64) = 40.9 dB at
# 8 bits for a Gaussian value over ±4σ, 34.8 dB at 7 bits (x86's activation step), and less for heavy-tailed
# values (a product of products). `predicted_sqnr_db` takes each value's range and power from the eager
# model and propagates the noise as a fraction r of each value's power: each quantization adds its ε, so a
# chain of N alike quantizations ends N times noisier (SQNR − 10·log10(N)); an add or a cat sums its inputs'
# noise powers (independent noise), which is what an add that cancels most of its inputs' signal amplifies;
# a mul adds its inputs' relative noise amplitudes. The floor is that prediction less MARGIN_DB, for what the
# model leaves out (see `predicted_sqnr_db`). Calibrated on the column "SQNR − prediction" of `python -m tools.fuzz`
# (graphs that pass every other check, known-open features left out): over 586 graphs (seed 1, 10 min) its
# minimum was −6.9 dB on PTQ x86, −8.1 dB on qnnpack, −1.9 dB on QAT x86 (medians +5.4, +4.5, +5.3 dB); the
# class this fuzz found (QAT cat ranges) measures −12 to −31 dB. 10 dB keeps the known-good graphs passing
# and still catches that class.
MARGIN_DB = 10.0
WEIGHT_BITS = 8
FIXED_RANGES = {"sigmoid": 1.0, "tanh": 2.0}  # outputs on a fixed grid over [0, 1] / [-1, 1]


def gaussian_quantization_db(bits: int) -> float:
    """SQNR of one b-bit quantization of a Gaussian value over a ±4σ range."""
    return 10 * math.log10(12 * (2**bits - 1) ** 2 / 64)


def quantizations(spec: Spec, index: int) -> tuple[int, int]:
    """How many quantizations (each adds its own noise) ``spec.ops[index]`` makes, as (weights, activations): a
    conv or linear quantizes its weight and its output, an add/mul/cat/average pool/standalone BN/activation its
    int8 output. BN after a conv and a clamp activation (ReLU, ReLU6, hardtanh) after a conv, BN or add fold
    into their producer when they alone read it; max pooling, Dropout/Identity and flatten move codes
    unchanged."""
    op = spec.ops[index]
    sole = spec.readers()[op.inputs[0]] == 1
    producer = _producer(spec.ops, op.inputs[0]) if sole else None
    if op.kind in ("conv", "conv_again"):
        return 1, 1
    if op.kind == "head":
        return 1, 2  # average pool, linear
    if op.kind == "bn":
        return 0, int(producer is None or producer.kind not in ("conv", "conv_again"))
    if op.kind == "act":
        folds = op.get("fn") in CLAMP_ACTS and producer is not None and producer.kind in ("conv", "bn", "add")
        return 0, int(not folds)
    if op.kind == "alias" or (op.kind == "pool" and op.get("fn") == "max"):
        return 0, 0
    return 0, 1


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the channel (dimension 1) of a float64 tensor."""
    return t.mean([d for d in range(t.dim()) if d != 1])


def _activation_gain(op: Op, x: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean square derivative of an activation over its eager input: the factor on
    independent noise."""
    with torch.enable_grad():
        x = x.detach().double().requires_grad_()
        (grad,) = torch.autograd.grad(_ACT_FUNCTIONS[str(op.get("fn"))](x, **_act_kwargs(op)).sum(), x)
    return _per_channel(grad.pow(2))


def _linear_noise(weight: torch.Tensor, groups: int, noise: torch.Tensor) -> torch.Tensor:
    """Per output channel, the noise power a conv or linear layer passes on from independent input noise of
    per-channel power ``noise``: Σ over its taps of w²·noise (exact for white noise; the bias adds none)."""
    squared = weight.detach().double().pow(2)
    if squared.dim() == 2:
        return squared @ noise
    k = squared.shape[-1]
    noise_map = noise.view(1, -1, 1, 1).expand(1, noise.numel(), k, k)
    return F.conv2d(noise_map, squared, groups=groups).flatten()


def predicted_sqnr_db(spec: Spec, model: RandomGraph, values: list[torch.Tensor], bits: int) -> float:
    """The SQNR of the worst output if every quantization adds noise as the module comment above says, at
    ``bits`` for activations (``WEIGHT_BITS`` for weights, taken as Gaussian over ±4σ). ``values`` are the
    eager ``model``'s (``RandomGraph.values``): each value's range and power per channel, each activation's
    slope; the model's weights and BN statistics give each layer's noise gain.

    Noise is tracked as a power per element of each channel, since a per-tensor quantization adds the same
    step²/12 to every channel however small its share of the signal, and a later layer that weighs such a
    channel heavily amplifies it. A conv or linear layer passes on Σ w²·noise over its taps (white noise); an
    unfolded BN multiplies each channel's noise by its square gain; an elementwise activation by its mean square
    slope, a scale by its square; adds sum it (an add of a value with itself quadruples it); a cat stacks its
    inputs' channels; pools and a folded BN keep each channel's noise-to-signal ratio; a mul adds its inputs'
    relative amplitudes (the bound for correlated inputs such as x·x). Weight quantization adds its relative
    noise to each output channel's power. Left out, so covered by ``MARGIN_DB``: noise correlated between
    branches that share a producer (counted as independent: pessimistic where an add cancels it), spatially
    correlated noise through convs (counted as white), ranges the observers choose other than min/max, a clamp
    folded into its producer's range (counted at the producer's wider range)."""
    weight_noise = 10 ** (-gaussian_quantization_db(WEIGHT_BITS) / 10)
    levels = 2**bits - 1
    power = [_per_channel(v.double().pow(2)) + 1e-30 for v in values]

    # A cat's inputs and output share one grid (nested cats join one group), so a member is quantized on the
    # group's span, however much narrower its own range.
    groups = nx.utils.UnionFind(range(len(values)))
    for out, op in enumerate(spec.ops, start=1):
        if op.kind == "cat":
            groups.union(out, *(_root(spec.ops, v) for v in op.inputs))
    spans = {}
    for group in groups.to_sets():
        members = [values[v] for v in group]
        spans.update(dict.fromkeys(group, float(max(v.max() for v in members) - min(v.min() for v in members))))

    def step_noise(value: torch.Tensor, op: Op | None, index: int | None = None) -> float:
        span = FIXED_RANGES.get(str(op.get("fn"))) if op is not None and op.kind == "act" else None
        span = span or (spans[index] if index is not None else float(value.max() - value.min()))
        return span**2 / (12 * levels**2)

    def kept_ratio(v_in: int, v_out: int) -> torch.Tensor:  # each channel's noise-to-signal ratio kept
        return noise[v_in] * power[v_out] / power[v_in]

    noise = [torch.full_like(power[0], step_noise(values[0], None, 0))]  # the input's quantize
    for out, op in enumerate(spec.ops, start=1):
        ins = op.inputs
        layer = model.layers[f"op{op.get('conv')}" if op.kind == "conv_again" else f"op{out - 1}"] \
            if op.kind in ("conv", "conv_again", "head") else None
        if op.kind in ("add", "iadd"):
            carried = 4 * noise[ins[0]] if ins[0] == ins[1] else noise[ins[0]] + noise[ins[1]]
        elif op.kind == "mul":  # relative noise amplitudes add: the bound for correlated inputs (x · x)
            carried = power[out] * sum((noise[v] / power[v]).sqrt() for v in ins) ** 2
        elif op.kind == "cat":
            carried = torch.cat([noise[v] for v in ins])
        elif op.kind == "act":
            carried = _activation_gain(op, values[ins[0]]) * noise[ins[0]]
        elif op.kind == "scale":
            carried = float(op.get("by")) ** 2 * noise[ins[0]]
        elif op.kind == "bn" and quantizations(spec, out - 1)[1]:
            bn = model.layers[f"op{out - 1}"]
            carried = (bn.weight.detach().double() ** 2 / (bn.running_var.double() + bn.eps)) * noise[ins[0]]
        elif op.kind in ("conv", "conv_again"):
            carried = _linear_noise(layer.weight, layer.groups, noise[ins[0]])
        elif op.kind == "head":  # average pool (keeps each channel's ratio), its quantize, then the linear
            pooled = F.adaptive_avg_pool2d(values[ins[0]].double(), 1).flatten(1)
            # int8 average pooling keeps its input's grid: the pooled value is requantized on the input's span
            pooled_noise = noise[ins[0]] * _per_channel(pooled.pow(2)) / power[ins[0]] + step_noise(pooled, None, ins[0])
            carried = _linear_noise(layer.weight, 1, pooled_noise)
        else:  # alias, pools, a folded BN
            carried = kept_ratio(ins[0], out)
        weights, activations = quantizations(spec, out - 1)
        activations -= op.kind == "head"  # the head's pooled quantize is counted above
        grid = ins[0] if op.kind == "pool" else out  # int8 pooling keeps its input's grid
        noise.append(carried + weights * weight_noise * power[out] + activations * step_noise(values[out], op, grid))
    # An output with no predicted noise (constant, e.g. a ReLU6 of negatives) is exact; ``sqnr`` skips such.
    return min((10 * math.log10(float(power[v].mean() / noise[v].mean())) for v in spec.outputs
                if float(noise[v].mean()) > 0), default=math.inf)


def sqnr_floor(spec: Spec, model: RandomGraph, values: list[torch.Tensor], pipeline: str) -> float:
    """The SQNR a quantized ``pipeline`` must reach on ``spec``'s eager float ``model``."""
    # x86's 7-bit step (reduce_range) into the kernels that add int16 pairs: the worst case on any CPU
    bits = 8 if "qnnpack" in pipeline else 7
    return predicted_sqnr_db(spec, model, values, bits) - MARGIN_DB


def _run_pipeline(pipeline: str, model: nn.Module, x: torch.Tensor) -> nn.Module:
    if pipeline == "fusebn":
        return PassManager([FuseBN()]).run(model, x)
    if pipeline == "fusebn_cle":
        return PassManager([FuseBN(), CLE()]).run(model, x)
    if pipeline.startswith("ptq_"):
        return PassManager([FuseBN(), PTQ([x], backend=pipeline[4:], progress=False)]).run(model, x)
    if pipeline.startswith("qat_"):
        qm = PassManager([QAT(backend=pipeline[4:])]).run(model, x)
        # Calibrate as a training loop would observe, without changing the function: QAT blocks normalise with
        # the running statistics, other BN and Dropout stay in eval mode.
        qpasses.freeze_bn_stats(qm).train()
        for m in qm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                m.eval()
        with torch.no_grad():
            qm(x)
        return qpasses.convert(qm.eval())
    raise ValueError(f"unknown pipeline {pipeline!r}; one of {PIPELINES}")


def error_outcome(pipeline: str, exc: Exception, known_open: dict[str, KnownOpen] | None = None) -> Outcome:
    """Classify an exception a pipeline raised (property (a)); ``known_open`` defaults to ``KNOWN_OPEN``."""
    detail = f"{type(exc).__name__}: {exc}"
    if known := known_error(pipeline, detail, known_open):
        return Outcome(pipeline, SKIPPED, known)
    if not isinstance(exc, QPassesError) or "internal error" in str(exc):
        return Outcome(pipeline, INTERNAL, detail)
    if isinstance(exc, VerificationError):
        return Outcome(pipeline, NOT_PRESERVED, detail)
    if "\n" in str(exc).strip():
        return Outcome(pipeline, UNCLEAR, detail)
    return Outcome(pipeline, REFUSED, detail)


def _open_on(known_open: dict[str, KnownOpen], pipeline: str) -> dict[str, KnownOpen]:
    return {name: known for name, known in known_open.items()
            if known.pipelines is None or pipeline in known.pipelines}


def open_on(spec: Spec, pipeline: str, known_open: dict[str, KnownOpen] | None = None) -> list[str]:
    """The features of ``spec`` open on ``pipeline`` in ``known_open`` (default ``KNOWN_OPEN``)."""
    known = _open_on(KNOWN_OPEN if known_open is None else known_open, pipeline)
    return sorted(f for f in spec.features() if f in known and not known[f].messages)


def known_error(pipeline: str, detail: str, known_open: dict[str, KnownOpen] | None = None) -> str | None:
    """The class of ``known_open`` (default ``KNOWN_OPEN``) an error message on ``pipeline`` belongs to."""
    known = _open_on(KNOWN_OPEN if known_open is None else known_open, pipeline)
    return next((name for name, k in known.items() if any(m in detail for m in k.messages)), None)


def check(spec: Spec, pipelines: tuple[str, ...] = PIPELINES,
          known_open: dict[str, KnownOpen] | None = None) -> list[Outcome]:
    """Capture ``spec``'s network and run each pipeline on it; one ``Outcome`` for the capture and for each.
    A pipeline (the capture too) a feature of ``spec`` is open on in ``known_open`` (default ``KNOWN_OPEN``;
    ``{}`` checks everything) is skipped, an error ``known_open`` names is classified as skipped."""
    model = RandomGraph(spec)
    x = example_input(spec)
    with torch.no_grad():
        expected = model(x)
        values = model.values(x)
    skipped = {p: ", ".join(open_on(spec, p, known_open)) for p in (CAPTURE, *pipelines)}
    outcomes = [Outcome(p, SKIPPED, why) for p, why in skipped.items() if why]
    if not skipped[CAPTURE]:
        try:
            with torch.no_grad():
                captured_db = sqnr(expected, qpasses.trace(model, x)(x))
            status = OK if captured_db >= PRESERVE_DB else CAPTURE_MISMATCH
            outcomes.append(Outcome(CAPTURE, status, f"{captured_db:.1f} dB against eager", captured_db))
        except Exception as exc:  # noqa: BLE001 - every exception is classified, none is lost
            outcomes.append(error_outcome(CAPTURE, exc, known_open))
    for pipeline in (p for p in pipelines if not skipped[p]):
        try:
            result = _run_pipeline(pipeline, model, x)
            with torch.no_grad():
                got_db = sqnr(expected, result(x))
                reference = None if pipeline in PRESERVING else existing_state(result).reference
                reference_db = None if reference is None else sqnr(expected, reference(x))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(error_outcome(pipeline, exc, known_open))
            continue
        floor_db = PRESERVE_DB if pipeline in PRESERVING else sqnr_floor(spec, model, values, pipeline)
        if pipeline in PRESERVING:
            status = OK if got_db >= floor_db else NOT_PRESERVED
            detail = f"{got_db:.1f} dB against eager, floor {floor_db:.1f} dB"
        else:
            status = OK if got_db >= floor_db else BELOW_FLOOR
            status = REFERENCE_BELOW_FLOOR if status == OK and reference_db < floor_db else status
            detail = (f"{got_db:.1f} dB against eager (its reference graph {reference_db:.1f} dB), "
                      f"floor {floor_db:.1f} dB")
        outcomes.append(Outcome(pipeline, status, detail, got_db, floor_db))
    return outcomes
