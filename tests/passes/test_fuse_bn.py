import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qpasses import PassManager, trace
from qpasses.analysis.metrics import sqnr
from qpasses.errors import QPassesError
from qpasses.passes import FuseBN, PassContext
from tests.nets import ACTIVATIONS, RandomNet, randomize_bn


def fuse(model, x):
    pm = PassManager([FuseBN()])
    return pm.run(model, x), pm.report.records[-1]


def test_fusebn_preserves_every_model(named_model):
    name, model, x = named_model
    gm, record = fuse(model, x)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(gm(x), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
        assert sqnr(expected, gm(x)) > 80
    assert record.stats["folded"] > 0 and record.sqnr_db > 80
    if name != "tiny_unet":  # every BN of these models follows a conv
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules()), name


def test_lite0_bn_act_is_folded_and_relu6_kept():
    import timm

    model = randomize_bn(timm.create_model("tf_efficientnet_lite0")).eval()
    x = torch.randn(1, 3, 64, 64)
    gm, record = fuse(model, x)
    assert record.stats["folded"] == 49
    users = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv_stem"][0].users
    assert [type(gm.get_submodule(u.target)) for u in users] == [nn.ReLU6]


class Wrap(nn.Module):
    def __init__(self, producer, bn, flatten=False):
        super().__init__()
        self.producer, self.bn, self.flatten = producer, bn, flatten

    def forward(self, x):
        return torch.tanh(self.bn(self.producer(x)))


@pytest.mark.parametrize(
    "producer, bn, shape",
    [
        (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 10)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 8, 8)),
        (nn.Conv3d(3, 5, 3), nn.BatchNorm3d(5), (2, 3, 5, 5, 5)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 7)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        (nn.ConvTranspose3d(2, 4, 2, groups=2, bias=False), nn.BatchNorm3d(4), (1, 2, 3, 3, 3)),
        (nn.Linear(5, 7), nn.BatchNorm1d(7), (4, 5)),
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), (2, 3, 6, 6)),
    ],
)
def test_fold_every_producer_kind(producer, bn, shape):
    torch.manual_seed(0)
    model = randomize_bn(Wrap(producer, bn)).eval()
    x = torch.randn(*shape)
    gm, record = fuse(model, x)
    assert record.stats["folded"] == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_linear_on_3d_input_is_not_folded():
    model = randomize_bn(Wrap(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()  # BN1d would normalise dim 1 (length 4)
    gm, record = fuse(model, torch.randn(2, 4, 4))
    assert record.stats == {"kept": 1, "lone": 1}
    assert "2-D" in " ".join(record.notes)


def test_conv_with_two_consumers_and_lone_bn_stay():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.lone = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.lone(x)

    model = randomize_bn(Net()).eval()
    x = torch.randn(1, 3, 4, 4)
    gm, record = fuse(model, x)
    assert record.stats == {"lone": 2}
    assert isinstance(gm.bn, nn.BatchNorm2d) and isinstance(gm.lone, nn.BatchNorm2d)
    torch.testing.assert_close(gm(x), model(x))


def test_shared_conv_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x * 2)

    model = randomize_bn(Net()).eval()
    gm, record = fuse(model, torch.randn(1, 3, 4, 4))
    assert record.stats["kept"] == 1 and "called 2 times" in record.notes[0]


def test_training_mode_is_a_clear_error():
    model = randomize_bn(RandomNet([("conv", "relu", 4)])).train()
    gm = trace(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(QPassesError, match=r"'layers.0.1' is in training mode.*model.eval\(\).*QAT\(\)"):
        FuseBN().run(gm, PassContext(example_inputs=()))


def test_fusebn_through_the_manager_on_a_train_mode_model_names_the_pass():
    model = randomize_bn(RandomNet([("conv", "relu", 4)])).train()
    with pytest.raises(QPassesError, match=r"FuseBN \(pass 1 of 1, after tracing\): BatchNorm 'layers.0.1'"):
        PassManager([FuseBN()]).run(model, torch.randn(2, 3, 8, 8))


blocks = st.lists(
    st.tuples(
        st.sampled_from(["conv", "depthwise", "residual", "residual_relu", "cat", "gate", "scale"]),
        st.sampled_from(sorted(ACTIVATIONS)),
        st.integers(2, 6),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks, seed=st.integers(0, 1000))
def test_fusebn_preserves_random_networks(blocks, seed):
    torch.manual_seed(seed)
    model = randomize_bn(RandomNet(blocks), seed).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, _ = fuse(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
