"""Capture with ``torch.export`` and normalise the ATen graph into qpasses' canonical module-level form.

``torch.export.export(model, args, strict=False)`` gives the pre-dispatch ATen training IR (the graph PT2E
quantizes). It captures what symbolic tracing cannot: Parameters used directly (``self.gamma.reshape``,
``self.cls_token.expand``), shape arithmetic, ``nn.MultiheadAttention`` as linears. The passes, though, work
on one canonical form: ``call_module`` nodes for convs, linears and batch norms (the user's own modules,
shared, not copied), ``call_function`` with the functional/operator forms the op table
(``qpasses.quant.ops``) knows, ``get_attr`` for parameters read directly. ``normalise`` rebuilds that form
from the exported graph with one translation record per ATen op (``MODULE_OPS``, ``FUNCTION_OPS``);
any other ATen op stays a ``call_function`` on the op itself, which the op table runs float.

A conv/linear/BN op becomes a call of the module whose weight (BN: running mean) it reads, when calling
that module computes exactly the op: the module's class keeps its ``torch.nn`` forward (an ``nn.Conv3d``
subclass that only changes ``__init__`` stays itself) and its configuration equals the op's arguments.
Otherwise (timm's ``Conv2dSame`` pads in its forward, which export records as a separate pad op; an
attention block's ``in_proj_weight``) a plain ``torch.nn`` module is built around the same Parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.operator_schemas import normalize_function
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.errors import TraceError
from qpasses.graph.modules import buffers_restored, eval_mode

__all__ = ["FUNCTION_OPS", "MODULE_OPS", "SOURCE_KEY", "ExportedGraph", "export_graph", "normalise", "normalise_module"]

aten = torch.ops.aten

# node.meta key: the name of the exported node a canonical node computes (one record per ATen op, so one node;
# a pass that replaces a canonical node copies its meta, ReplaceFunctional's add_relu that of the ReLU). The
# PT2E quantizer carries decisions made on the canonical graph back onto the user's ATen nodes by it.
SOURCE_KEY = "export_source"


# ------------------------------------------------------------------------------------------- module ops


def _tuple(value: Any, n: int) -> Any:
    if isinstance(value, str):  # conv padding "same" / "valid"
        return value
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    return values * n if len(values) == 1 else values


def _transposed(args: dict) -> bool:
    """aten.convolution says so in ``transposed``; aten.conv_transpose*d are the ops with ``output_padding``."""
    return bool(args.get("transposed", "output_padding" in args))


def _conv_class(args: dict) -> type[nn.Module]:
    rank = args["weight"].meta["val"].dim() - 2
    if _transposed(args):
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]


def _conv_config(args: dict) -> dict[str, Any]:
    rank = args["weight"].meta["val"].dim() - 2
    config = {name: _tuple(args[name], rank) for name in ("stride", "padding", "dilation")}
    config["groups"] = args["groups"]
    if _transposed(args):
        config["output_padding"] = _tuple(args["output_padding"], rank)
    return config


def _conv_build(cls: type[nn.Module], args: dict, config: dict) -> nn.Module:
    shape = args["weight"].meta["val"].shape
    groups = config["groups"]
    transposed = issubclass(cls, nn.modules.conv._ConvTransposeNd)
    in_ch, out_ch = (shape[0], shape[1] * groups) if transposed else (shape[1] * groups, shape[0])
    return cls(in_ch, out_ch, tuple(shape[2:]), bias=args["bias"] is not None, device="meta", **config)


def _linear_build(cls: type[nn.Module], args: dict, config: dict) -> nn.Module:
    out_features, in_features = args["weight"].meta["val"].shape
    return nn.Linear(in_features, out_features, bias=args["bias"] is not None, device="meta")


def _bn_class(args: dict) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[args["input"].meta["val"].dim()]


def _bn_build(cls: type[nn.Module], args: dict, config: dict) -> nn.Module:
    features = args["running_mean"].meta["val"].shape[0]
    return cls(features, eps=config["eps"], momentum=args["momentum"], affine=args["weight"] is not None,
               device="meta")


@dataclass(frozen=True)
class ModuleOp:
    """An ATen op that a ``torch.nn`` module computes: which class, which of its configuration attributes the
    op's arguments fix, how to build one, and which argument holds the owning module's tensors.

    ``tensors`` maps the op's argument names to the module's attribute names; the first one locates the owner.
    """

    module_class: Callable[[dict], type[nn.Module]]
    config: Callable[[dict], dict[str, Any]]
    build: Callable[[type[nn.Module], dict, dict], nn.Module]
    tensors: tuple[tuple[str, str], ...]
    training_arg: str | None = None  # an argument that must be False (BN in eval mode)


_CONV_TENSORS = (("weight", "weight"), ("bias", "bias"))
_CONV = ModuleOp(_conv_class, _conv_config, _conv_build, _CONV_TENSORS)
_BN = ModuleOp(_bn_class, lambda args: {"eps": args["eps"]}, _bn_build,
               (("running_mean", "running_mean"), ("running_var", "running_var"), ("weight", "weight"),
                ("bias", "bias")), training_arg="training")

MODULE_OPS: dict[Any, ModuleOp] = {
    aten.conv1d.default: _CONV, aten.conv2d.default: _CONV, aten.conv3d.default: _CONV,
    aten.conv1d.padding: _CONV, aten.conv2d.padding: _CONV, aten.conv3d.padding: _CONV,
    aten.convolution.default: _CONV,
    aten.conv_transpose1d.default: _CONV, aten.conv_transpose2d.input: _CONV, aten.conv_transpose3d.input: _CONV,
    aten.linear.default: ModuleOp(lambda a: nn.Linear, lambda a: {}, _linear_build, _CONV_TENSORS),
    aten.batch_norm.default: _BN,
}


# ----------------------------------------------------------------------------------------- function ops


@dataclass(frozen=True)
class FunctionOp:
    """An ATen op with a functional/operator/method form the op table knows.

    ``target``: a callable (``call_function``) or a method name (``call_method``). ``args``: the op's argument
    names passed positionally, in the target's order; ``kwargs``: op argument → target keyword. An argument
    not in either must be at its default, else the op stays an ATen call.
    """

    target: Callable | str
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...] = ()
    in_place: bool = False  # the op writes its input: the target is called with ``inplace=True``


def _same(target: Callable | str, *args: str, **kwargs: str) -> FunctionOp:
    return FunctionOp(target, args, tuple(kwargs.items()))


def _in_place(target: Callable, *args: str) -> FunctionOp:
    return FunctionOp(target, args, in_place=True)


_POOL = ("input", "kernel_size", "stride", "padding")
FUNCTION_OPS: dict[Any, FunctionOp] = {
    aten.relu.default: _same(F.relu, "input"),
    aten.relu_.default: _in_place(F.relu, "input"),
    aten.hardtanh.default: _same(F.hardtanh, "input", "min_val", "max_val"),
    aten.hardtanh_.default: _in_place(F.hardtanh, "input", "min_val", "max_val"),
    aten.relu6.default: _same(F.relu6, "input"),
    aten.clamp.default: _same(torch.clamp, "input", "min", "max"),
    aten.hardswish.default: _same(F.hardswish, "input"),
    aten.hardswish_.default: _in_place(F.hardswish, "input"),
    aten.hardsigmoid.default: _same(F.hardsigmoid, "input"),
    aten.leaky_relu.default: _same(F.leaky_relu, "input", "negative_slope"),
    aten.sigmoid.default: _same(torch.sigmoid, "input"),
    aten.tanh.default: _same(torch.tanh, "input"),
    aten.silu.default: _same(F.silu, "input"),
    aten.gelu.default: _same(F.gelu, "input", approximate="approximate"),
    aten.add.Tensor: _same(operator.add, "input", "other"),
    aten.add_.Tensor: _same(operator.iadd, "input", "other"),
    aten.sub.Tensor: _same(operator.sub, "input", "other"),
    aten.mul.Tensor: _same(operator.mul, "input", "other"),
    aten.mul_.Tensor: _same(operator.imul, "input", "other"),
    aten.div.Tensor: _same(operator.truediv, "input", "other"),
    aten.cat.default: _same(torch.cat, "tensors", "dim"),
    aten.matmul.default: _same(torch.matmul, "input", "other"),
    aten.bmm.default: _same(torch.bmm, "input", "mat2"),
    aten.max_pool1d.default: _same(F.max_pool1d, *_POOL, "dilation", "ceil_mode"),
    aten.max_pool2d.default: _same(F.max_pool2d, *_POOL, "dilation", "ceil_mode"),
    aten.avg_pool1d.default: _same(F.avg_pool1d, *_POOL, "ceil_mode", "count_include_pad"),
    aten.avg_pool2d.default: _same(F.avg_pool2d, *_POOL, "ceil_mode", "count_include_pad", "divisor_override"),
    aten.adaptive_avg_pool1d.default: _same(F.adaptive_avg_pool1d, "input", "output_size"),
    aten.adaptive_avg_pool2d.default: _same(F.adaptive_avg_pool2d, "input", "output_size"),
    aten.mean.dim: _same(torch.mean, "input", "dim", "keepdim"),
    aten.flatten.using_ints: _same(torch.flatten, "input", "start_dim", "end_dim"),
    aten.reshape.default: _same(torch.reshape, "input", "shape"),
    aten.view.default: _same("view", "input", "size"),
    aten.permute.default: _same(torch.permute, "input", "dims"),
    aten.transpose.int: _same(torch.transpose, "input", "dim0", "dim1"),
    aten.squeeze.dim: _same(torch.squeeze, "input", "dim"),
    aten.unsqueeze.default: _same(torch.unsqueeze, "input", "dim"),
    aten.expand.default: _same("expand", "input", "size"),
    aten.contiguous.default: _same("contiguous", "input"),
    aten.dropout.default: _same(F.dropout, "input", "p", "train"),
    aten.chunk.default: _same(torch.chunk, "input", "chunks", "dim"),
    aten.split.Tensor: _same(torch.split, "input", "split_size", "dim"),
}


# --------------------------------------------------------------------------------------------- normalise


@dataclass
class ExportedGraph:
    """The canonical graph of an exported model, and the ATen ops left as they are (they run float)."""

    graph_module: fx.GraphModule
    aten_ops: dict[str, int]  # op name → count of nodes left as ATen calls
    batch_generic: bool  # False: every size is the example's (export specialised the batch dimension too)


def export_graph(model: nn.Module, inputs: tuple) -> ExportedGraph:
    """``torch.export`` (non-strict, training IR) of the eval-mode ``model``, normalised (``normalise``).

    Raises whatever export raises (the capture ladder falls back on any failure) and ``TraceError`` for a
    graph the normaliser cannot map (buffer mutations, inputs export did not keep).
    """
    modes = {name: module.training for name, module in model.named_modules()}
    with eval_mode(model), buffers_restored(model):
        exported = _export_batch_generic(model, inputs)
        if exported is None:
            exported = torch.export.export(model, inputs, strict=False)
        captured = normalise(model, exported, len(inputs))
    # The GraphModule and the containers fx builds for dotted names start in training mode; they take the
    # model's modes, as a symbolic trace's do (a lowered model in training mode ran its float BN on batch
    # statistics).
    for name, module in captured.graph_module.named_modules():
        if name in modes:
            module.training = modes[name]
    return captured


def _export_batch_generic(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram | None:
    """The export with the batch (first) dimension of every tensor input symbolic, or None where the model
    fixes it. Export specialises every size it sees, so a graph exported at batch 2 would refuse calibration
    batches of 8; export also specialises a size of 1, so a batch of 1 is exported as two copies."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        return None
    widened = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                    for x in inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                    for x in inputs)
    try:
        exported = torch.export.export(model, widened, dynamic_shapes=dynamic, strict=False)
    except Exception:  # a model that needs its example's batch size: export it as it is
        return None
    return exported if _batch_is_symbolic(exported) else None


def _batch_is_symbolic(exported: torch.export.ExportedProgram) -> bool:
    users = {s.arg.name for s in exported.graph_signature.input_specs if s.kind is InputKind.USER_INPUT}
    return _symbolic_batch([n for n in exported.graph.nodes if n.op == "placeholder" and n.name in users])


def _symbolic_batch(inputs: list[fx.Node]) -> bool:
    values = [n.meta.get("val") for n in inputs]
    sizes = [v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
    return bool(sizes) and all(isinstance(size, torch.SymInt) for size in sizes)


def _op_name(target: Any) -> str:
    return getattr(target, "_qualified_op_name", None) or getattr(target, "__name__", str(target))


def _arguments(node: fx.Node) -> dict[str, Any] | None:
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return None if pair is None else dict(pair.kwargs)


class _Normaliser:
    """Rebuilds ``source`` (an exported graph) in canonical form around ``model``'s modules and tensors.

    ``tensor_of``: the source nodes that stand for a parameter, buffer or constant (an exported program's lifted
    placeholders, an unlifted graph module's ``get_attr``s), by qualified name; ``constants``: tensors that are
    not attributes of ``model``."""

    def __init__(self, model: nn.Module, source: fx.Graph, tensor_of: dict[fx.Node, str],
                 constants: dict[str, Any], out_spec: pytree.TreeSpec | None):
        self.model = model
        self.source = source
        self.constants = constants
        self.out_spec = out_spec
        self.graph = fx.Graph()
        self.owned: dict[str, Any] = {}  # qualified name → module / parameter / buffer the graph reads
        self.env: dict[fx.Node, Any] = {}
        self.tensor_of = dict(tensor_of)
        self.built: dict[tuple, str] = {}  # (class, config, tensor names) → name of a module built for it
        self.aten_ops: dict[str, int] = {}
        self.attrs: dict[str, fx.Node] = {}  # one get_attr node per tensor read directly

    def tensor(self, name: str) -> Any:
        if name in self.constants:
            return self.constants[name]
        owner, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(owner) if owner else self.model, attr)

    def get_attr(self, name: str) -> fx.Node:
        if name not in self.attrs:
            self.owned.setdefault(name, self.tensor(name))
            self.attrs[name] = self.graph.get_attr(name)
        return self.attrs[name]

    def run(self) -> ExportedGraph:
        inputs = []
        for node in self.source.nodes:
            if node in self.tensor_of:
                continue
            if node.op == "placeholder":
                inputs.append(node)
                self.env[node] = self.copy_meta(self.graph.placeholder(node.name), node)
            elif node.op == "output":
                (flat,) = node.args
                if self.out_spec is None:
                    self.graph.output(self.value(flat))
                else:
                    self.graph.output(pytree.tree_unflatten([self.value(v) for v in flat], self.out_spec))
            elif node.op == "call_function":
                self.env[node] = self.copy_meta(self.translate(node), node)
            elif node.op == "call_module" and not node.users:
                continue  # the input guards ``ExportedProgram.module()`` checks: nothing reads them
            else:
                raise TraceError(f"exported node '{node.name}' ({node.op} {node.target}) has no canonical form")
        functionalize(self.graph)
        self.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "get_attr")
        self.check_names()
        gm = fx.GraphModule(self.owned, self.graph, type(self.model).__name__)
        return ExportedGraph(gm, dict(sorted(self.aten_ops.items())), _symbolic_batch(inputs))

    def check_names(self) -> None:
        """A module built under an owner's name ('bn1' for timm's BatchNormAct2d) must not hide another name the
        graph reads below it ('bn1.act'), unless that is the very attribute the built module holds."""
        for built in self.built.values():
            module = self.owned[built]
            for name, value in self.owned.items():
                if name.startswith(built + "."):
                    held: Any = module
                    for part in name[len(built) + 1:].split("."):
                        held = getattr(held, part, None)
                    if held is not value:
                        raise TraceError(f"module '{built}' built for an ATen op would hide '{name}'")

    @staticmethod
    def copy_meta(new: Any, old: fx.Node) -> Any:
        if isinstance(new, fx.Node):
            for key in ("nn_module_stack", "stack_trace"):
                if key in old.meta:
                    new.meta[key] = old.meta[key]
            new.meta[SOURCE_KEY] = old.name
        return new

    def value(self, arg: Any) -> Any:
        """The canonical value of an exported argument (a parameter read directly becomes a ``get_attr``)."""
        if isinstance(arg, fx.Node):
            if arg in self.tensor_of:
                return self.get_attr(self.tensor_of[arg])
            return self.env[arg]
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def translate(self, node: fx.Node) -> Any:
        record = MODULE_OPS.get(node.target)
        if record is not None:
            call = self.module_call(node, record)
            if call is not None:
                return call
        function = FUNCTION_OPS.get(node.target)
        if function is not None:
            call = self.function_call(node, function)
            if call is not None:
                return call
        if isinstance(node.target, torch._ops.OpOverload):
            name = _op_name(node.target)
            self.aten_ops[name] = self.aten_ops.get(name, 0) + 1
        return self.graph.call_function(node.target, self.value(node.args), self.value(node.kwargs))

    def function_call(self, node: fx.Node, op: FunctionOp) -> fx.Node | None:
        arguments = _arguments(node)
        if arguments is None:
            return None
        defaults = {a.name: a.default_value for a in node.target._schema.arguments if a.has_default_value()}
        used = set(op.args) | {name for name, _ in op.kwargs}
        if any(arguments[name] != defaults.get(name) for name in arguments if name not in used):
            return None  # e.g. add with alpha: no operator form
        args = self.value(tuple(arguments[name] for name in op.args))
        kwargs = self.value({keyword: arguments[name] for name, keyword in op.kwargs})
        if op.in_place:
            kwargs["inplace"] = True
        if isinstance(op.target, str):
            return self.graph.call_method(op.target, args, kwargs)
        return self.graph.call_function(op.target, args, kwargs)

    def module_call(self, node: fx.Node, op: ModuleOp) -> fx.Node | None:
        arguments = _arguments(node)
        if arguments is None or (op.training_arg and arguments[op.training_arg]):
            return None
        names = {attr: self.tensor_of.get(arguments[arg]) for arg, attr in op.tensors if arguments[arg] is not None}
        if any(name is None for name in names.values()):
            return None  # a computed weight (a slice, a product): no module holds it
        cls = op.module_class(arguments)
        config = op.config(arguments)
        first = names[op.tensors[0][1]]
        owner_name, _, _ = first.rpartition(".")
        owner = self.model.get_submodule(owner_name) if owner_name else self.model
        if owner_name and self.owned.get(owner_name, owner) is owner and self.computes(owner, cls, config, names,
                                                                                        owner_name):
            self.owned[owner_name] = owner
            return self.graph.call_module(owner_name, (self.value(arguments[_first_input(node)]),))
        key = (cls, tuple(sorted(config.items())), tuple(sorted(names.items())))
        if key not in self.built:
            module = op.build(cls, arguments, config)
            for attr, name in names.items():
                setattr(module, attr, self.tensor(name))
            device = self.tensor(first).device
            for attr, buffer in list(module.named_buffers()):
                if buffer.is_meta:  # no op argument holds it (BN's num_batches_tracked): the owner's, or zeros
                    held = getattr(owner, attr, None)
                    module.register_buffer(attr, held if isinstance(held, torch.Tensor) and not held.is_meta
                                           else torch.zeros(buffer.shape, dtype=buffer.dtype, device=device))
            module.eval()
            qualname = self.fresh_name(first, cls)
            self.owned[qualname] = module
            self.built[key] = qualname
        return self.graph.call_module(self.built[key], (self.value(arguments[_first_input(node)]),))

    def computes(self, owner: nn.Module, cls: type[nn.Module], config: dict, names: dict[str, str],
                 owner_name: str) -> bool:
        """Whether calling ``owner`` computes the op: it is a ``cls`` with ``cls``' forward, its configuration,
        and the very tensors the op reads."""
        if not isinstance(owner, cls) or type(owner).forward is not cls.forward or list(owner.children()):
            return False
        if isinstance(owner, _BatchNorm) and not owner.track_running_stats:
            return False
        if getattr(owner, "padding_mode", "zeros") != "zeros":
            return False
        if any(_tuple(getattr(owner, k), 1) != _tuple(v, 1) for k, v in config.items()):
            return False
        expected = {attr for attr, value in owner.named_parameters(recurse=False) if value is not None}
        expected |= {attr for attr in ("running_mean", "running_var") if getattr(owner, attr, None) is not None}
        prefix = f"{owner_name}." if owner_name else ""
        return names == {attr: prefix + attr for attr in expected}

    def fresh_name(self, tensor_name: str, cls: type[nn.Module]) -> str:
        """A module name for a ``cls`` built around ``tensor_name`` ('a.in_proj_weight' → 'a.in_proj',
        'conv.weight' → 'conv' where that is free, the model's own 'weight' → 'conv2d')."""
        owner, _, attr = tensor_name.rpartition(".")
        if attr in ("weight", "running_mean"):
            base = owner or cls.__name__.lower()
        else:
            base = f"{owner}.{attr.removesuffix('_weight')}".lstrip(".")
        taken = set(self.owned) | {name for name, _ in self.model.named_modules() if name != base}
        candidate, i = base, 1
        while candidate in taken or not candidate:
            candidate = f"{base}_{i}"
            i += 1
        return candidate


def _first_input(node: fx.Node) -> str:
    return node.target._schema.arguments[0].name


def normalise(model: nn.Module, exported: torch.export.ExportedProgram, n_inputs: int) -> ExportedGraph:
    """The canonical module-level graph of ``exported`` (an export of ``model``), sharing ``model``'s
    modules and parameters."""
    signature = exported.graph_signature
    user_inputs = [s for s in signature.input_specs if s.kind is InputKind.USER_INPUT]
    if len(user_inputs) != n_inputs:
        raise TraceError(f"the exported graph of {type(model).__name__} takes {len(user_inputs)} tensor inputs, "
                         f"the example inputs are {n_inputs}")
    bad_outputs = [spec for spec in signature.output_specs if spec.kind is not OutputKind.USER_OUTPUT]
    if bad_outputs:
        raise TraceError(f"the exported graph of {type(model).__name__} mutates "
                         f"{[spec.target for spec in bad_outputs]}; it cannot be normalised")
    kinds = {spec.arg.name: spec for spec in signature.input_specs}
    lifted = {node: kinds[node.name].target for node in exported.graph.nodes
              if node.op == "placeholder" and kinds[node.name].kind is not InputKind.USER_INPUT}
    return _Normaliser(model, exported.graph, lifted, exported.constants, exported.call_spec.out_spec).run()


def normalise_module(gm: fx.GraphModule) -> ExportedGraph:
    """The canonical module-level graph of an unlifted exported graph module (``ExportedProgram.module()``, the
    graph PT2E's ``prepare_pt2e`` annotates), sharing ``gm``'s parameters. Its inputs are ``gm``'s graph's
    placeholders (flat, as the graph takes them), its output the graph's flat outputs; every canonical node
    names the node of ``gm`` it computes in ``meta[SOURCE_KEY]``. ``gm`` itself is not changed."""
    attributes = {node: node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for node, name in attributes.items():
        owner, _, attr = name.rpartition(".")
        if not isinstance(getattr(gm.get_submodule(owner) if owner else gm, attr, None), torch.Tensor):
            raise TraceError(f"exported node '{node.name}' reads '{name}', which is not a tensor; "
                             "it has no canonical form")
    return _Normaliser(gm, gm.graph, attributes, {}, None).run()


# In-place ops the canonical graph may hold, with their out-of-place forms.
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}
# Ops whose result can share storage with their input: an in-place update of it reaches other values.
_VIEWS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
          torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.select}
_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                 "expand_as", "narrow", "select", "t", "chunk", "split"}


def functionalize(graph: fx.Graph) -> None:
    """Make the exported graph's in-place ops out of place, as every pass assumes.

    The export records an in-place update as it runs (``a += b`` on ``a``, an activation with
    ``inplace=True``), and an eval-mode dropout as a call that returns its input itself; later readers of
    ``a`` (or of the value the dropout returned) then see the update through the alias, which a pass that
    rewrites the op out of place (ReplaceFunctional's add) silently loses. Eval-mode dropouts are dropped,
    each in-place op's later readers read its result instead, and the op becomes out of place. An in-place
    update of a view (a slice, a reshape) would change its base too: that is refused, and the capture
    ladder goes on to its next rung.
    """
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.dropout \
                and not (_arguments(node) or {}).get("training", True):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or not (node.target in _OUT_OF_PLACE or node.kwargs.get("inplace")):
            continue
        target = node.args[0]
        if isinstance(target, fx.Node) and _is_view(target):
            raise TraceError(f"exported node '{node.name}' updates a view ('{target.name}') in place, which "
                             f"changes the tensor it views too; write it out of place")
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
        if node.target in _OUT_OF_PLACE:
            node.target = _OUT_OF_PLACE[node.target]
        else:
            node.kwargs = {**node.kwargs, "inplace": False}


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s value may share storage with its input: a view op, by the table above or, for an ATen
    op left as it is, by its schema's alias annotation (``slice.Tensor(Tensor(a) self) -> Tensor(a)``)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return any(ret.alias_info is not None for ret in node.target._schema.returns)
    return node.target in _VIEWS or node.target in _VIEW_METHODS
