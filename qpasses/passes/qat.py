"""QAT: quantization-aware training as one pipeline entry."""

from __future__ import annotations

from qpasses.passes.base import CompositePass, Pass, Stage
from qpasses.passes.fold_bn_for_training import FoldBNForTraining
from qpasses.passes.insert_fake_quant import InsertFakeQuant
from qpasses.quant.spec import QuantConfig


class QAT(CompositePass):
    """FoldBNForTraining → InsertFakeQuant: ``PassManager([QAT(bits=4)]).run(model, x)`` returns a model to
    train in any loop, then ``qpasses.convert(model)`` lowers it to ``backend``'s int8 kernels.

    ``backend``, ``config``, ``bits``, ``per_channel``, ``quantize_output``: as for PTQ (the same placement and
    grids).
    ``learnable``: LSQ-learned scales instead of min/max-tracked ranges; ``learn_zero_point``: learn
    the zero points of affine grids too. With PTQ in the same pipeline, the fake-quants start from its
    calibrated ranges and its lowering is deferred as well.
    """

    stage = Stage.QUANTIZE
    provides = frozenset({"qat_blocks", "fake_quantized"})

    def __init__(self, backend: str = "x86", config: QuantConfig | None = None, bits: int | None = None,
                 learnable: bool = False, learn_zero_point: bool = False, per_channel: bool | None = None,
                 quantize_output: bool | None = None):
        self.parts: list[Pass] = [
            FoldBNForTraining(),
            InsertFakeQuant(backend, config, bits, per_channel, learnable, learn_zero_point, quantize_output),
        ]
