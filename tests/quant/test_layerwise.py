import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpasses import PassManager
from qpasses.passes import BiasCorrection, Calibrate, FuseBN, InsertObservers
from qpasses.passes.base import PassContext
from qpasses.passes.reference import Reference
from qpasses.quant.layerwise import Simulation, annotation_of, sweep
from qpasses.quant.lowering import fake_quantize_weight


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = x + self.conv(x)  # an int8 add, and a value read twice
        return self.fc(torch.flatten(self.pool(x), 1))  # the pool's output requantized on its input's grid


def observed(backend, calib):
    torch.manual_seed(0)
    return PassManager([FuseBN(), InsertObservers(backend=backend), Calibrate(calib, progress=False)]).run(
        Residual().eval(), calib[0])


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(n)]


def fc_inputs_in_reference(gm, calib):
    """The input of the classifier's F.linear in the reference graph of ``gm``, per batch."""
    reference = Reference().run(copy.deepcopy(gm), PassContext(example_inputs=(calib[0],))).graph_module
    (linear,) = [n for n in reference.graph.nodes if n.op == "call_function" and n.target is F.linear]
    seen = []
    interpreter = torch.fx.Interpreter(reference)
    original = interpreter.run_node

    def run_node(node):
        result = original(node)
        if node is linear.args[0]:
            seen.append(result)
        return result

    interpreter.run_node = run_node
    for x in calib:
        interpreter.run(x)
    return seen


# qnnpack rounds biases to their int32 grid and widens add grids; x86 keeps biases float
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_the_quantized_path_is_the_reference_graph_of_the_weights_and_biases_decided(backend):
    calib = batches(3)
    gm = observed(backend, calib)
    seen = {}

    def shift_bias(layer):
        seen[layer.node.target] = [x.clone() for x in layer.quant_inputs]
        with torch.no_grad():
            layer.module.bias.add_(0.05)  # a decision the layers after it must see, as BiasCorrection's are
        return fake_quantize_weight(layer.module.weight, layer.spec)

    assert sweep(gm, annotation_of(gm, "test"), [(x,) for x in calib], shift_bias) == 3
    for swept, reference in zip(seen["fc"], fc_inputs_in_reference(gm, calib), strict=True):
        assert torch.equal(swept, reference)


RUN, CORRECT = Simulation.run, BiasCorrection._correct


def float_values_held_at_each_correction(monkeypatch, n_batches):
    """The float tensors the sweep's simulation computed that are still alive when BiasCorrection starts on each
    layer (before it reads anything), and the int8 codes alive then."""
    alive: list[weakref.ref] = []
    calib = batches(n_batches)

    def recording_run(self, node, env, params, quantized):
        result = RUN(self, node, env, params, quantized)
        if isinstance(result, torch.Tensor):
            alive.append(weakref.ref(result))
        return result

    held = []

    def counting_correct(layer, target, indices):
        gc.collect()
        # The float path passes the model's input through its quantize/dequantize: the caller's batches themselves.
        tensors = [t for t in (r() for r in alive) if t is not None and not any(
            t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in calib)]
        held.append((sum(t.is_floating_point() for t in tensors), sum(not t.is_floating_point() for t in tensors)))
        # With gradients on, the biases' autograd graph kept every batch's input and temporaries alive.
        assert not torch.is_grad_enabled()
        return CORRECT(layer, target, indices)

    monkeypatch.setattr(Simulation, "run", recording_run)
    monkeypatch.setattr(BiasCorrection, "_correct", staticmethod(counting_correct))
    PassManager([FuseBN(), InsertObservers(backend="x86"), Calibrate(calib, progress=False),
                 BiasCorrection(calib)]).run(Residual().eval(), calib[0])
    return held


def test_bias_correction_holds_no_float_activation_of_any_batch_between_layers(monkeypatch):
    # Between layers the quantized path keeps each batch's int8 values as their codes, one byte a value, and the
    # float path runs one batch at a time before the sweep (only per-channel sums are kept): the float values held
    # no longer grow with the number of batches (the codes do, at a quarter of float's size).
    few, many = (float_values_held_at_each_correction(monkeypatch, n) for n in (2, 6))
    assert len(few) == len(many) == 3
    assert [floats for floats, _ in few] == [floats for floats, _ in many] == [0, 0, 0]
    assert [codes for _, codes in many] == [3 * codes for _, codes in few]  # one int8 value per batch
