"""One epoch of QAT on real data (scikit-learn's digits) beats PTQ at 4 bits."""

import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.passes import PTQ, QAT, FuseBN
from tests.nets import conv_bn_act
from zoo.data import digits


def fit(model, images, labels, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=order)
        for i in range(0, len(labels), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def test_one_epoch_of_qat_beats_ptq_at_4_bits():
    torch.manual_seed(0)
    (train_x, train_y), (test_x, test_y) = (digits(split, size=8).tensors for split in ("train", "test"))
    model = nn.Sequential(conv_bn_act(3, 16), conv_bn_act(16, 32, stride=2), conv_bn_act(32, 32, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    fit(model, train_x, train_y, epochs=3, lr=1e-2)
    float_accuracy = accuracy(model, test_x, test_y)
    assert float_accuracy > 0.9
    calibration = [train_x[i : i + 64] for i in range(0, 256, 64)]
    # qnnpack: per-tensor weights, 4-bit weights and activations everywhere, first and last layer included
    ptq = PassManager([FuseBN(), PTQ(calibration, backend="qnnpack", bits=4, progress=False)]).run(model, train_x[:1])
    qm = PassManager([QAT(backend="qnnpack", bits=4)]).run(model, train_x[:1])
    fit(qm, train_x, train_y, epochs=1, lr=1e-3)
    qat_accuracy = accuracy(qpasses.convert(qm), test_x, test_y)
    # measured: float 96.4%, PTQ 94.7%, QAT 96.4% (lowered)
    assert qat_accuracy > accuracy(ptq, test_x, test_y)
