import torch
import torch.fx as fx
from torch import nn

from qpasses.graph.regions import blocks, parent_module, single_entry_regions


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.act, self.conv_b = nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv_b(self.act(self.conv_a(x)))


def net() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), Plain(), Residual(), nn.ReLU(), nn.Conv2d(4, 2, 1)))


def _names(region):
    return [n.name for n in region.nodes]


def test_a_chain_is_cut_after_every_node_and_a_residual_block_is_one_region():
    gm = net()
    regions = single_entry_regions(gm.graph)
    assert [_names(r) for r in regions] == [
        ["_0"], ["_1_conv_a"], ["_1_act"], ["_1_conv_b"],
        ["_2_conv1", "_2_act", "_2_conv2", "add"],  # the skip keeps two values live until the add
        ["_3"], ["_4"],
    ]
    for before, region in zip(regions, regions[1:], strict=False):
        assert region.entry is before.exit
    assert regions[0].entry.op == "placeholder" and regions[-1].exit.name == "_4"


def test_blocks_merge_regions_of_one_parent_module_with_the_activations_after_them():
    gm = net()
    convs = {n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)}
    merged = blocks(gm.graph, lambda n: parent_module(n) if n in convs else None)
    assert [_names(r) for r in merged] == [
        ["_0"],
        ["_1_conv_a", "_1_act", "_1_conv_b"],
        ["_2_conv1", "_2_act", "_2_conv2", "add", "_3"],
        ["_4"],
    ]
    x = torch.randn(2, 3, 5, 5)
    env = {}
    for node in gm.graph.nodes:  # each block reads only its entry: running it from there gives its exit
        if node.op == "placeholder":
            env[node] = x
        elif node.op != "output":
            env[node] = gm.get_submodule(node.target)(*fx.map_arg(node.args, env.__getitem__)) \
                if node.op == "call_module" else node.target(*fx.map_arg(node.args, env.__getitem__))
    for region in merged:
        local = {region.entry: env[region.entry]}
        for node in region.nodes:
            args = fx.map_arg(node.args, local.__getitem__)  # KeyError if it read anything else
            local[node] = gm.get_submodule(node.target)(*args) if node.op == "call_module" else node.target(*args)
        assert torch.equal(local[region.exit], env[region.exit])


def test_a_graph_with_two_inputs_has_no_cut():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    assert single_entry_regions(fx.symbolic_trace(Two()).graph) == []
