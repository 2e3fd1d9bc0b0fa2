"""The op table: one record per op, found from each way a graph calls it."""

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses.quant import ops
from qpasses.quant.ops import Role


def test_each_record_with_an_int8_kernel_of_its_own_names_it_and_its_reference_form():
    for op in ops.OPS:
        builds_a_kernel = op.role in (Role.COMPUTE, Role.FUNCTIONAL, Role.DERIVED, Role.REQUANT)
        assert (op.lowering is not None) == builds_a_kernel, op.name
        assert bool(op.reference) == (op.role is Role.COMPUTE or op.float_functional is not None), op.name
        assert (op.qat is not None) == (op.role is Role.COMPUTE), op.name


class _Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU6()

    def forward(self, x):
        return torch.relu(F.max_pool2d(self.act(self.conv(x)), 2)).flatten(1).sigmoid()


def test_a_node_finds_its_record_by_module_function_or_method():
    gm = fx.symbolic_trace(_Calls())
    found = {n.name: ops.op_of(gm, n).name for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    assert found == {"conv": "conv2d", "act": "relu6", "max_pool2d": "max_pool", "relu": "relu",
                     "flatten": "flatten", "sigmoid": "sigmoid"}
    assert ops.computing_op(gm.conv).role is Role.COMPUTE


def test_a_float_functional_call_finds_the_record_of_its_method_not_of_the_tensor_method():
    root = nn.Module()
    root.ff = FloatFunctional()
    graph = fx.Graph()
    x = graph.placeholder("x")
    owner = graph.get_attr("ff")
    graph.output((graph.call_method("add_relu", (owner, x, x)), graph.call_method("add", (x, x))))
    gm = fx.GraphModule(root, graph)
    add_relu, add = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert ops.op_of(gm, add_relu).name == "add_relu" and ops.op_of(gm, add_relu).role is Role.FUNCTIONAL
    assert ops.op_of(gm, add) is None  # a tensor's own add: no int8 kernel


def test_a_subclass_with_its_own_forward_computes_something_else():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    assert ops.module_op(Doubled(1, 1, 1)).name == "conv2d"
    assert ops.computing_op(Doubled(1, 1, 1)) is None
    assert ops.computing_op(torch.nn.Conv2d(1, 1, 1)).qat.__name__ == "QATConv2d"
