"""Every zoo model quantizes: FuseBN + PTQ lowers it to int8 kernels that follow the float model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.ao.nn.quantized as nnq

import qpasses_zoo as zoo
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.passes import PTQ, FuseBN
from qpasses.quant.backends import get_backend
from tests.nets import randomize_bn


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_model_quantizes_and_follows_the_float_model(name):
    torch.manual_seed(0)
    pretrained = name.endswith("efficientnet_lite0")
    model = zoo.get(name, pretrained=pretrained)
    if not pretrained:
        # Freshly initialised BNs (unit scale, zero shift) can leave outputs near zero (MobileNetV2: ~1e-10).
        randomize_bn(model)
    size = 32 if zoo.spec(name).input_size == 32 else 64
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, size, size, generator=g)]
    config = get_backend("x86").default_config()
    # min/max ranges keep this test fast; the observers have their own tests.
    config = dataclasses.replace(config, activation=config.activation.replace(observer="minmax"))
    qm = PassManager([FuseBN(), PTQ(calibration, backend="x86", config=config, progress=False)]).run(
        model, calibration[0][:1])
    assert any(isinstance(m, nnq.Conv2d) for m in qm.modules())
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        assert sqnr(model(x), qm(x)) > 10.0
