"""Annotation: decide, per node, what runs int8, which activation folds into which producer, and where
a value needs an observed range. It writes decisions, not observers; ``InsertObservers`` places them.

Rules (the design notes' "what" step):
- conv / linear / FloatFunctional add, mul, cat / hardswish-like ops run int8 and requantize: their
  output is observed. A clamp-like activation (ReLU, ReLU6, hardtanh, clamp) that alone reads such an
  output is folded into it: the observer sits after the activation, whose bounds then are the
  quantized range's own saturation (ReLU6 becomes the clamp of the [0, 6] range).
- ops that keep their input's qparams (pooling, reshapes, padding, upsampling) are not re-observed.
- fixed-range (sigmoid, tanh) and derived (add_scalar, mul_scalar) ops get their qparams from the kernel.
- ops without an int8 kernel stay float; a float value that feeds an int8 op is observed there, and
  becomes a quantize at lowering.
- ``reduce_range`` (7-bit steps) stays only on values read by a conv/linear whose kernel adds pairs of u8×s8
  products into a saturating int16 on this CPU (``Backend.saturates``); every other value gets the full range.
- cat inputs produced by requantizing ops read only by the cat share the cat's observer (transitively,
  through nested cats), so the cat is a plain concatenation; a folded activation shares only a grid whose
  values all lie within its bounds.
- a value is rounded to 8 bits only where something reads it as int8 codes (``_int8_readers``): a conv or
  linear, or, directly or through qparams-preserving and clamp-like ops, an int8 op whose own value is so
  read; the model's output counts only with ``config.quantize_output``. A conv/linear whose value nothing
  reads as int8 (the logits; in a transformer the qkv projection before attention, fc1 before GELU, the
  projections into a residual stream that layer norms read) computes from int8 inputs and weights but writes
  float where the engine has such a kernel (``lowering.has_float_output_kernel``: linears on x86/fbgemm); an
  add, mul, cat, hardswish-like, fixed-range or scalar op whose value nothing reads as int8 runs float on
  its dequantized inputs, which is exact where the int8 op would round once more. This is PT2E's rule
  (X86InductorQuantizer observes a value only where a quantized op reads it).
- a runtime without int8 kernels of its own for some arithmetic (``Backend.float_arithmetic``: inductor's add and
  mul) runs those float, unless one is a conv/linear's post-op (below): their inputs are not rounded for them.
- a lowering whose kernels do more in one call than the torch.ao engine's (``FusedKernels``: inductor's, for the
  PT2E quantizer) changes two things: every conv/linear whose value nothing reads as int8 writes float, and a conv/linear
  read only by one of its post-ops (hardswish, add, add_relu) is computed with it in one kernel, unrounded in
  between: the post-op is recorded as folded into it (``Annotation.fused``) and only its output is observed.
  A preset for such a runtime names its post-ops itself (``Backend.post_op``: the ``inductor`` preset's
  reference graph then gives inductor conv → add (→ ReLU) → quantize, which it runs as one
  ``qconv2d_pointwise.binary``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from networkx.utils import UnionFind
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.cpu import CpuInt8Features, cpu_int8_features
from qpasses.errors import QPassesError
from qpasses.quant.backends import Backend, UnsupportedSpecError
from qpasses.quant.ops import REQUANTIZING, Role, clamp_bounds, describe_op, is_tensor_node, role_of
from qpasses.quant.spec import QuantConfig, QuantPair, QuantSpec

INT8 = (Role.COMPUTE, Role.FUNCTIONAL, Role.REQUANT, Role.FIXED, Role.DERIVED, Role.FUSED_ACT)


@dataclass
class Annotation:
    """Decisions for one graph; kept in ``state_of(gm).annotation`` from observer insertion to lowering."""

    backend: str
    config: QuantConfig
    roles: dict[str, Role] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)  # activation (or post-op) node → producer node
    pairs: dict[str, QuantPair] = field(default_factory=dict)  # int8 node → its weight/activation specs
    observe: dict[str, QuantSpec] = field(default_factory=dict)  # value node → activation spec
    shared: dict[str, str] = field(default_factory=dict)  # value node → value whose observer it shares
    float_reasons: dict[str, str] = field(default_factory=dict)  # node → why it stays float
    float_output: set[str] = field(default_factory=set)  # int8 conv/linear nodes that write float
    notes: list[str] = field(default_factory=list)  # decisions the report should show

    def is_int8(self, name: str) -> bool:
        return self.roles.get(name, Role.NONE) in INT8

    def int8_ops(self) -> list[str]:
        """The nodes that run an int8 kernel of their own (a folded activation runs in its producer's), or
        ``QPassesError`` if there is none: a configuration that quantizes nothing is an error, not silence."""
        int8 = [name for name, role in self.roles.items() if self.is_int8(name) and role is not Role.FUSED_ACT]
        if not int8:
            example = next(iter(self.float_reasons.values()), "none")
            raise QPassesError("nothing to quantize: no node has an int8 kernel under this configuration "
                               f"({len(self.float_reasons)} op(s) stay float, e.g. {example})")
        return int8


@dataclass(frozen=True)
class FusedKernels:
    """What the int8 kernels of a lowering other than the backend's torch.ao engine compute in one call (inductor's
    CPU lowering of a PT2E graph: ``qconv``/``qlinear`` with a post-op, writing int8 or float).

    ``float_output``: every conv/linear can write float. ``post_op``: whether a node (read from the conv/linear
    it is given) runs in the conv/linear's kernel as a post-op."""

    float_output: bool
    post_op: Callable[[fx.GraphModule, fx.Node, fx.Node], bool]


def qualified_name(node: fx.Node) -> str:
    """The name ``QuantConfig.for_node`` (``keep_float``, ``by_name``) matches for ``node``: a module call's
    qualified module name, any other node's own name."""
    return node.target if node.op == "call_module" else node.name


def annotate(gm: fx.GraphModule, backend: Backend, config: QuantConfig,
             cpu: CpuInt8Features | None = None, kernels: FusedKernels | None = None) -> Annotation:
    """The decisions for ``gm`` under ``backend`` and ``config``; ``reduce_range`` is kept only on values read by
    a kernel that needs it on ``cpu`` (None: this machine's, ``qpasses.cpu.cpu_int8_features``). ``kernels``: the
    fused kernels of the lowering that will run the graph, where it is not the backend's torch.ao engine (None:
    the post-ops ``backend`` names, ``Backend.post_op``).

    ``backend.float_arithmetic``: an add or mul it names runs float unless it is a conv/linear's post-op; a cat
    it names concatenates int8 codes only where all its inputs share its grid (``_share_cat_observers``), the
    others run float on their inputs before rounding. Where the first pass runs some of them float, a second
    decides again with them reading floats: what only they read is then not rounded for them (a squeeze-excite
    gate's hardsigmoid, read by a float mul, runs float on its conv's unrounded value, as in PT2E's graphs)."""
    ann = _annotate(gm, backend, config, cpu, kernels, float_arithmetic=frozenset())
    float_arithmetic = frozenset(
        node.name for node in gm.graph.nodes
        if node.target in backend.float_arithmetic and role_of(gm, node) is Role.FUNCTIONAL
        and (ann.roles[node.name] is Role.FUNCTIONAL and not all(arg.name in ann.shared for arg in node.args[1])
             if node.target == "cat" else ann.roles[node.name] is Role.FLOAT))
    if float_arithmetic:
        ann = _annotate(gm, backend, config, cpu, kernels, float_arithmetic)
    return ann


def _annotate(gm: fx.GraphModule, backend: Backend, config: QuantConfig, cpu: CpuInt8Features | None,
              kernels: FusedKernels | None, float_arithmetic: frozenset[str]) -> Annotation:
    """``annotate`` with the ops of ``backend.float_arithmetic`` named in ``float_arithmetic`` reading floats (the
    cats among them run float too; the others run float where they are not a post-op in any case)."""
    ann = Annotation(backend=backend.name, config=config)
    quantized: dict[fx.Node, bool] = {}
    read_as_int8 = _int8_readers(gm, config, float_arithmetic)
    post_op = kernels.post_op if kernels is not None else backend.post_op
    for node in gm.graph.nodes:
        role = role_of(gm, node)
        if role is not Role.NONE:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            pair = config.for_node(qualified_name(node), type(module) if module is not None else None)
            if pair is None and role is not Role.PRESERVING:
                ann.float_reasons[node.name] = "kept float by the configuration"
                role = Role.FLOAT
            elif role is Role.COMPUTE:
                pair = _runnable_pair(backend, module, pair, node, ann)
                if not read_as_int8[node]:
                    _decide_float_output(gm, node, module, backend, ann, kernels, post_op)
            elif role in _REQUANTIZES_ON_DEMAND and not read_as_int8[node]:
                ann.float_reasons[node.name] = (f"{describe_op(gm, node)}: nothing reads its value as int8, so it runs "
                                                "float on its dequantized inputs (exact, one rounding fewer)")
                role = Role.FLOAT
            if pair is not None:
                ann.pairs[node.name] = pair
            if post_op is not None and role in (Role.REQUANT, Role.FUNCTIONAL) and pair is not None:
                _fuse_post_op(gm, node, ann, post_op)
            if (role is Role.FUNCTIONAL and node.target in backend.float_arithmetic and node.name not in ann.fused
                    and (node.target != "cat" or node.name in float_arithmetic)):
                ann.pairs.pop(node.name, None)
                runtime = backend.runtime or backend.name
                ann.float_reasons[node.name] = (
                    f"{describe_op(gm, node)}: {runtime} concatenates int8 codes only of one grid, so the cat runs "
                    "float on its inputs as they are and is rounded once, where an int8 op reads it"
                    if node.target == "cat" else
                    f"{describe_op(gm, node)}: {runtime} has no int8 {node.target} kernel of its own (only as a "
                    "conv/linear's post-op), so it runs float on its inputs as they are")
                role = Role.FLOAT
        if role is Role.FUSED_ACT:
            role = _fuse_or_preserve(gm, node, ann)
        if role is Role.FLOAT and node.name not in ann.float_reasons:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            ann.float_reasons[node.name] = (
                "BatchNorm that was not folded: add FuseBN() before quantizing" if isinstance(module, _BatchNorm)
                else f"{describe_op(gm, node)} has no int8 kernel"
            )
        ann.roles[node.name] = role
        quantized[node] = _runs_quantized(node, role, quantized) and node.name not in ann.float_output

    for node in gm.graph.nodes:
        role = ann.roles[node.name]
        if role in REQUANTIZING and node.name not in ann.float_output:
            value = next((a for a, p in ann.fused.items() if p == node.name), node.name)
            ann.observe[value] = ann.pairs[node.name].activation
        if role in INT8 and role is not Role.FUSED_ACT:
            for arg in node.all_input_nodes:
                if is_tensor_node(arg) and not quantized[arg] and arg.name not in ann.observe:
                    ann.observe[arg.name] = ann.pairs[node.name].activation
    _share_cat_observers(gm, ann)
    _clip_at_range_where_activation_is_bounded(gm, ann)
    _full_range_where_no_saturating_kernel_reads(gm, ann, backend, cpu if cpu is not None else cpu_int8_features())
    return ann


def _clip_at_range_where_activation_is_bounded(gm: fx.GraphModule, ann: Annotation) -> None:
    """A folded activation with an upper bound (ReLU6, hardtanh, clamp) runs as its value's grid clipping at
    the top of the observed range; ``headroom`` would let codes run on past it, so such a value (and the
    cat group sharing its grid) clips at its range."""
    nodes = {n.name: n for n in gm.graph.nodes}
    bounded = [a for a in ann.fused if a in ann.observe and ann.roles[a] is Role.FUSED_ACT
               and clamp_bounds(gm, nodes[a])[1] is not None]
    owners = {ann.shared.get(name, name) for name in bounded}
    for name, spec in list(ann.observe.items()):
        if spec.headroom and ann.shared.get(name, name) in owners:
            ann.observe[name] = spec.replace(headroom=False)


def _feeds_saturating_kernel(gm: fx.GraphModule, node: fx.Node, ann: Annotation, backend: Backend,
                              cpu: CpuInt8Features) -> bool:
    """Whether a conv/linear kernel that needs ``reduce_range`` inputs on ``cpu`` (``Backend.saturates``) reads
    ``node``'s value, directly or through qparams-preserving ops."""
    for user in node.users:
        role = ann.roles.get(user.name, Role.NONE)
        if role is Role.COMPUTE and backend.saturates(gm.get_submodule(user.target), ann.pairs[user.name].weight, cpu):
            return True
        if role is Role.PRESERVING and _feeds_saturating_kernel(gm, user, ann, backend, cpu):
            return True
    return False


def _full_range_where_no_saturating_kernel_reads(gm: fx.GraphModule, ann: Annotation, backend: Backend,
                                                 cpu: CpuInt8Features) -> None:
    """reduce_range exists for the u8 inputs of kernels that add pairs of u8×s8 products into a saturating int16
    (fbgemm's without AVX-512 VNNI, its depthwise ones on every CPU); a value no such kernel reads (logits, add
    operands, inputs of oneDNN's convs on a VNNI CPU) keeps the full 8-bit range. A cat-shared group is one grid:
    its members' values are read only by its cats, so the readers of its outermost cat decide for all of them."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, spec in list(ann.observe.items()):
        owner = nodes[ann.shared.get(name, name)]
        if spec.reduce_range and not _feeds_saturating_kernel(gm, owner, ann, backend, cpu):
            ann.observe[name] = spec.replace(reduce_range=False)


# Ops that write a new grid only so that an int8 reader can take their value as codes.
_REQUANTIZES_ON_DEMAND = (Role.FUNCTIONAL, Role.REQUANT, Role.FIXED, Role.DERIVED)


def _int8_readers(gm: fx.GraphModule, config: QuantConfig, float_arithmetic: frozenset[str] = frozenset()
                  ) -> dict[fx.Node, bool]:
    """Per node, whether something reads its value as int8 codes: a conv/linear, or an op that passes codes on
    (qparams-preserving, clamp-like, or one of ``_REQUANTIZES_ON_DEMAND``) whose own value is so read; the
    graph's output with ``config.quantize_output``. Ops the configuration keeps float read floats, and so do the
    ops named in ``float_arithmetic`` (run float for want of an int8 kernel: a cat's inputs are then rounded once,
    at the cat's value, where nothing else reads them as int8)."""
    reads: dict[fx.Node, bool] = {}

    def takes_codes(user: fx.Node) -> bool:
        if user.op == "output":
            return config.quantize_output
        role = role_of(gm, user)
        if role in (Role.NONE, Role.FLOAT) or user.name in float_arithmetic:
            return False
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        if role is not Role.PRESERVING and config.for_node(qualified_name(user),
                                                          type(module) if module is not None else None) is None:
            return False
        return role is Role.COMPUTE or reads[user]

    for node in reversed(gm.graph.nodes):
        reads[node] = any(takes_codes(user) for user in node.users)
    return reads


def _only_outputs_read(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether only the graph's output reads ``node``'s value, directly or through ops that keep a value's grid
    (reshapes, pooling) or clamp it (activations)."""
    return bool(node.users) and all(
        user.op == "output" or (role_of(gm, user) in (Role.PRESERVING, Role.FUSED_ACT) and _only_outputs_read(gm, user))
        for user in node.users)


def _decide_float_output(gm: fx.GraphModule, node: fx.Node, module, backend: Backend, ann: Annotation,
                         kernels: FusedKernels | None,
                         post_op: Callable[[fx.GraphModule, fx.Node, fx.Node], bool] | None) -> None:
    """A conv/linear whose value nothing reads as int8 writes float where the engine (or the lowering's
    ``kernels``) has an int8 kernel that does, unless ``post_op`` (the lowering's) reads its activation
    (``_activation_read_by_post_op``); the note says so for the model's output."""
    output = _only_outputs_read(gm, node)
    if post_op is not None and _activation_read_by_post_op(gm, node, post_op):
        return
    writes_float = kernels.float_output if kernels is not None else backend.writes_float_output(module)
    if writes_float:
        ann.float_output.add(node.name)
        if output:
            ann.notes.append(f"output stays float: {describe_op(gm, node)} computes from int8 inputs and weights "
                             "and writes the model's output in float, not rounded to 8 bits (as PT2E's "
                             "X86InductorQuantizer); quantize_output=True rounds it")
    elif output:
        ann.notes.append(f"output rounded to 8 bits: {describe_op(gm, node)} writes the model's output, and no "
                         f"{backend.engine or backend.name} int8 kernel for it writes float")


def _runnable_pair(backend: Backend, module, pair: QuantPair, node: fx.Node, ann: Annotation) -> QuantPair:
    """``pair``, or the nearest weight spec the backend's kernel for ``module`` can run (with a note).

    The configuration was checked as a whole; some kernels (transposed convs) take fewer weight formats.
    """
    # an asymmetric grid has no narrow range to keep (xnnpack's symmetric weights have one)
    candidates = [pair.weight, pair.weight.replace(axis=None),
                  pair.weight.replace(axis=None, symmetric=False, narrow_range=False)]
    first_error = None
    for weight in dict.fromkeys(candidates):
        try:
            backend.check_module(module, weight)
        except UnsupportedSpecError as exc:
            first_error = first_error or exc
            continue
        if weight != pair.weight:
            ann.notes.append(f"'{node.target}': {first_error}; using {weight} instead")
        return QuantPair(weight=weight, activation=pair.activation)
    raise first_error


def _fuse_or_preserve(gm: fx.GraphModule, node: fx.Node, ann: Annotation) -> Role:
    """Fold a clamp-like activation into its producer when it alone reads a requantizing op's output."""
    inputs = node.all_input_nodes
    lo, hi = clamp_bounds(gm, node)
    numeric = all(b is None or isinstance(b, int | float) for b in (lo, hi))
    # Every grid holds 0, so its saturation can stand in only for bounds on either side of 0.
    grid_can_clip = numeric and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    if len(inputs) == 1 and grid_can_clip:
        producer = inputs[0]
        if (ann.roles.get(producer.name) in REQUANTIZING and len(producer.users) == 1
                and producer.name not in ann.fused.values() and producer.name not in ann.float_output):
            ann.fused[node.name] = producer.name
            ann.pairs[node.name] = ann.pairs[producer.name]
            return Role.FUSED_ACT
    return Role.PRESERVING


def _activation_read_by_post_op(gm: fx.GraphModule, node: fx.Node,
                                post_op: Callable[[fx.GraphModule, fx.Node, fx.Node], bool]) -> bool:
    """Whether a clamp-like activation after the conv/linear ``node`` is read by an op the lowering runs as
    ``node``'s post-op (an add, for inductor). Such a conv writes codes, never float: torchao's inductor lowering
    (0.18) takes conv → activation → add on fp32 values for a binary post-op on a kernel that already has the
    activation fused, and fails (``AssertionError`` in its qconv weight-prepack pattern); PT2E's
    X86InductorQuantizer always rounds a conv + ReLU's value, so its graphs never hold that shape."""
    return any(role_of(gm, act) is Role.FUSED_ACT and any(post_op(gm, node, reader) for reader in act.users)
               for act in node.users)


def _fuse_post_op(gm: fx.GraphModule, node: fx.Node, ann: Annotation,
                  post_op: Callable[[fx.GraphModule, fx.Node, fx.Node], bool]) -> None:
    """Fold ``node`` into the conv/linear it reads when the lowering's kernel computes it as that one's post-op
    and nothing else reads the conv/linear (the first such input of an add; its other input stays as it is)."""
    for producer in node.all_input_nodes:
        if (ann.roles.get(producer.name) is Role.COMPUTE and len(producer.users) == 1
                and producer.name not in ann.float_output and producer.name not in ann.fused.values()
                and post_op(gm, producer, node)):
            ann.fused[node.name] = producer.name
            return


def _runs_quantized(node: fx.Node, role: Role, quantized: dict[fx.Node, bool]) -> bool:
    if role in INT8:
        return True
    if role is Role.PRESERVING:
        tensor_inputs = [a for a in node.all_input_nodes if a in quantized]
        return bool(tensor_inputs) and quantized[tensor_inputs[0]]
    return False


def _share_cat_observers(gm: fx.GraphModule, ann: Annotation) -> None:
    """Cat inputs produced by requantizing ops that only the cat reads write at the cat's qparams, so the
    cat is a plain concatenation. Sharing is transitive (a cat feeding a cat): each group, found by
    union-find, has one observer, owned by its outermost cat.

    A folded activation's bounds are its grid's saturation; on a shared grid they hold only if every value
    the group's observer sees (each input of its cats) lies within them, otherwise Lower would drop the
    activation and let the other inputs' range through (a ReLU folded into a grid spanning negatives).
    Such a value keeps its own observer, and the cat requantizes it.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    cats = [n for n in gm.graph.nodes
            if ann.roles[n.name] is Role.FUNCTIONAL and n.target == "cat" and n.name in ann.observe]
    groups = UnionFind()
    candidates: dict[str, fx.Node] = {}  # cat input → the cat it may share with
    for cat in cats:
        for arg in cat.args[1]:
            producer = nodes[ann.fused.get(arg.name, arg.name)]
            if (arg.name in ann.observe and ann.roles[producer.name] in REQUANTIZING and len(arg.users) == 1
                    and ann.observe[arg.name] == ann.observe[cat.name]):
                candidates[arg.name] = cat
                groups.union(cat.name, arg.name)
    seen: dict[str, list[fx.Node]] = {}  # group root → every value its cats read
    for cat in cats:
        seen.setdefault(groups[cat.name], []).extend(cat.args[1])
    grouped_cats = {cat.name for cat in cats if cat.name in candidates}  # their inputs are in ``seen``
    for name in list(candidates):
        bounds = _bounds(gm, nodes[name], ann)
        if bounds != (None, None) and not all(value.name in grouped_cats or _within(_bounds(gm, value, ann), bounds)
                                              for value in seen[groups[name]]):
            del candidates[name]
    # The owner of a group is its one cat whose value is not itself shared.
    owners = {groups[cat.name]: cat.name for cat in cats if cat.name not in candidates}
    for name in candidates:
        ann.shared[name] = owners[groups[name]]


def _bounds(gm: fx.GraphModule, node: fx.Node, ann: Annotation) -> tuple[float | None, float | None]:
    """The (min, max) a value is known to lie in: a folded activation's bounds, else unbounded."""
    return clamp_bounds(gm, node) if ann.roles.get(node.name) is Role.FUSED_ACT else (None, None)


def _within(inner: tuple[float | None, float | None], outer: tuple[float | None, float | None]) -> bool:
    """Whether bounds ``inner`` lie within ``outer`` (None: unbounded on that side)."""
    (lo, hi), (outer_lo, outer_hi) = inner, outer
    return ((outer_lo is None or (lo is not None and lo >= outer_lo))
            and (outer_hi is None or (hi is not None and hi <= outer_hi)))
