"""`make demo`: quantize the ImageNet-pretrained EfficientNet-Lite0 with qpasses, offline.

Traces timm's TF-padded ``tf_efficientnet_lite0`` (which torch.ao FX cannot trace), folds its
``BatchNormAct2d`` BNs, rewrites arithmetic into FloatFunctional modules, then runs FuseBN + PTQ for
x86 and qnnpack, calibrating on crops of real photos and comparing with the float model on other crops.
``PTQ(data)`` adds the measured best cheap passes of its setting (the recipe table: BiasCorrection on x86's
per-channel grids, CLE + HighBiasAbsorption + BiasCorrection on qnnpack's per-tensor ones); qnnpack is shown
without them too (``recipe=False``), to see what they rescue.
"""

from __future__ import annotations

import argparse

import torch
from skimage import data as skdata

import qpasses_zoo as zoo
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr, topk_agreement
from qpasses.passes import PTQ, FuseBN, ReplaceFunctional
from qpasses_zoo.data import SYMMETRIC, loader, photo_crops
from qpasses_zoo.models.lite0 import preprocess


def predictions(model: torch.nn.Module, images: torch.Tensor, classes: list[str]) -> list[str]:
    with torch.no_grad():
        probs = model(images).softmax(1)
    return [f"{classes[i]} ({p:.2f})" for p, i in zip(*probs.max(1), strict=True)]


def evaluate(float_model: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    with torch.no_grad():
        ref = torch.cat([float_model(b) for b in batches])
        out = torch.cat([model(b) for b in batches])
    return sqnr(ref, out), topk_agreement(ref, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration crops")
    parser.add_argument("--eval", type=int, default=128, help="evaluation crops")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    classes = zoo.imagenet_classes()
    model = zoo.get("tf_efficientnet_lite0", pretrained=True)
    photos = torch.stack([preprocess(skdata.chelsea(), args.size), preprocess(skdata.coffee(), args.size)])
    example = photos[:1]
    print("float Lite0 on chelsea, coffee:", predictions(model, photos, classes))

    pm = PassManager([FuseBN(), ReplaceFunctional()])
    print("\n" + pm.explain())
    folded = pm.run(model, example)
    print(pm.report)
    print("after FuseBN + ReplaceFunctional:", predictions(folded, photos, classes))

    calib = [b for (b,) in loader(photo_crops(args.calib, args.size, seed=0, split="calib", normalization=SYMMETRIC), 8)]
    evals = [b for (b,) in loader(photo_crops(args.eval, args.size, seed=1, split="eval", normalization=SYMMETRIC), 16)]
    pipelines = {
        "PTQ x86": [FuseBN(), PTQ(calib, backend="x86")],
        "PTQ without its recipe, qnnpack": [FuseBN(), PTQ(calib, backend="qnnpack", recipe=False)],
        "PTQ qnnpack": [FuseBN(), PTQ(calib, backend="qnnpack")],
    }
    for title, passes in pipelines.items():
        backend = title.split()[-1]
        pm = PassManager(passes)
        quantized = pm.run(model, example)
        print(f"\n== {title}: calibrated on {args.calib} crops, evaluated on {args.eval} other crops")
        print(pm.report)
        db, agreement = evaluate(model, quantized, evals)
        print(f"{backend}: SQNR of logits {db:.1f} dB, top-1 agreement with float {agreement:.1%}")
        print(f"{backend} int8 on chelsea, coffee:", predictions(quantized, photos, classes))


if __name__ == "__main__":
    main()
