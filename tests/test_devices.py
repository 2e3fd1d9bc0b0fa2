"""Device handling: calibration, QAT, AdaRound and sensitivity where the model and data are; lowering on the
CPU. The CUDA tests compare against the same work on the CPU and run only where a GPU is present."""

import logging

import pytest
import torch
from torch import nn

from qpasses import PassManager, convert
from qpasses.analysis.metrics import sqnr
from qpasses.analysis.sensitivity import Sensitivity
from qpasses.passes import PTQ, QAT, AdaRound, Calibrate, FuseBN, InsertObservers
from qpasses.quant.backends import get_backend
from qpasses.quant.fake_quant import FakeQuantize
from qpasses.quant.observers import Observer, make_observer
from qpasses.quant.spec import QuantSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def config(observer="minmax", weight_bits=8):
    base = get_backend("x86").default_config()
    return base.__class__(**{**base.__dict__, "activation": base.activation.replace(observer=observer),
                             "weight": base.weight.replace(bits=weight_bits)})


def observer_buffers(gm):
    return {f"{name}.{key}": value for name, m in gm.named_modules() if isinstance(m, Observer)
            for key, value in m.state_dict().items()}


def test_calibrate_on_the_cpu_device_option_equals_the_default():
    data = batches()
    runs = [PassManager([FuseBN(), InsertObservers("x86", config("percentile")), Calibrate(data, progress=False,
                                                                                         device=device)]).run(net(), data[0])
            for device in (None, "cpu")]
    first, second = (observer_buffers(gm) for gm in runs)
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_ptq_on_a_cpu_model_says_nothing_about_moving():
    data = batches()
    pm = PassManager([FuseBN(), PTQ(data, progress=False, device="cpu")])
    pm.run(net(), data[0])
    assert not any("moved the model" in note for record in pm.report.records for note in record.notes)


@cuda
@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_observers_on_cuda_hold_the_cpu_state(kind):
    spec = QuantSpec(signed=False, symmetric=False, observer=kind)
    on_cpu, on_gpu = make_observer(spec), make_observer(spec)
    for x in batches(4):
        on_cpu(x)
        on_gpu(x.cuda())
    for key, value in on_cpu.state_dict().items():
        gpu_value = on_gpu.state_dict()[key]
        assert gpu_value.device.type == "cuda", key
        if kind == "moving_average" and key.endswith("_val"):
            torch.testing.assert_close(value, gpu_value.cpu())  # the EMA's float ops may round differently
        else:
            assert torch.equal(value, gpu_value.cpu()), key  # counts, min and max are exact
    for a, b in zip(on_cpu.qparams(), on_gpu.qparams(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=0)


@cuda
@pytest.mark.parametrize("observer", ["minmax", "entropy"])
def test_ptq_calibrated_on_cuda_lowers_on_the_cpu_like_a_cpu_calibration(observer, caplog):
    data = batches()
    on_cpu = PassManager([FuseBN(), PTQ(data, config=config(observer), progress=False)]).run(net(), data[0])
    pm = PassManager([FuseBN(), PTQ(data, config=config(observer), progress=False)])
    with caplog.at_level(logging.INFO, logger="qpasses"):
        on_gpu = pm.run(net().cuda(), data[0].cuda())
    assert all(t.device.type == "cpu" for t in on_gpu.state_dict().values() if isinstance(t, torch.Tensor))
    assert any("moved the model from cuda" in note for record in pm.report.records for note in record.notes)
    assert "moved the model from cuda" in caplog.text
    probe = torch.cat(batches(2, seed=5))
    assert sqnr(on_cpu(probe), on_gpu(probe)) > 35.0  # only float differences of the convs on the GPU


@cuda
def test_qat_with_amp_on_cuda_trains_and_converts_on_the_cpu():
    data = batches(4)
    qm = PassManager([QAT(bits=8)]).run(net().train(), data[0]).cuda()
    optimizer = torch.optim.SGD(qm.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    for x in data:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = qm(x.cuda()).float().pow(2).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    fake_quants = [m for m in qm.modules() if isinstance(m, FakeQuantize)]
    assert fake_quants and all(b.device.type == "cuda" for m in fake_quants for b in m.buffers())
    qm.eval()
    probe = torch.cat(batches(2, seed=5))
    with torch.no_grad():
        simulated = qm(probe.cuda()).cpu()
    lowered = convert(qm)
    assert sqnr(simulated, lowered(probe)) > 30.0


@cuda
def test_adaround_on_cuda_rounds_like_on_the_cpu():
    data = batches()

    def rounded(model, calibration):
        pipeline = [FuseBN(), InsertObservers("x86", config(weight_bits=4)), Calibrate(calibration, progress=False),
                    AdaRound(calibration, iterations=60, lr=1e-2, progress=False)]
        return PassManager(pipeline).run(model, calibration[0])

    on_cpu, on_gpu = rounded(net(), data), rounded(net().cuda(), [x.cuda() for x in data])
    for name in ("0", "3", "6"):
        cpu_weight, gpu_weight = on_cpu.get_submodule(name).weight, on_gpu.get_submodule(name).weight.cpu()
        assert (cpu_weight != gpu_weight).float().mean() < 0.02, name  # a few choices may tip the other way


@cuda
def test_sensitivity_of_a_cuda_model_matches_the_cpu_table():
    data = batches()
    tables = [Sensitivity(model, data, config=config(), progress=False).run() for model in (net(), net().cuda())]
    for cpu_row, gpu_row in zip(tables[0].rows, tables[1].rows, strict=True):
        assert cpu_row.layer == gpu_row.layer
        assert abs(cpu_row.alone - gpu_row.alone) < 1.0 and abs(cpu_row.all_but - gpu_row.all_but) < 1.0
