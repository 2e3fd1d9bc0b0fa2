"""PTQ: post-training static quantization as one pipeline entry."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qpasses.passes.base import CompositePass, Pass, Stage
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.lower import Lower
from qpasses.quant.spec import QuantConfig
from qpasses.validation import check_count, check_data


class PTQ(CompositePass):
    """InsertObservers → Calibrate → Lower, so ``PassManager([FuseBN(), PTQ(data)])`` is the whole flow.

    ``backend``: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``; ``config``: a :class:`QuantConfig` (default: the
    backend's preset); ``bits``: shorthand for ``bits``-bit weights and activations (2–8);
    ``per_channel``: per-channel weights (default: the backend's preset); ``num_batches``: at most this many
    calibration batches; ``quantize_output``: round the model's output (logits) to 8 bits (default: the
    config's, False: a linear writing it computes int8 and writes float where the engine has such a kernel);
    ``device``: where calibration runs (default: where the model is; see ``Calibrate``, also for
    torch.distributed); lowering then moves the model to the CPU, where the int8 kernels run. The
    manager expands it into its three parts, each verified and reported.
    """

    stage = Stage.QUANTIZE
    provides = frozenset({"observed", "calibrated", "lowered"})

    def __init__(self, data: Iterable, backend: str = "x86", config: QuantConfig | None = None,
                 bits: int | None = None, per_channel: bool | None = None, num_batches: int | None = None,
                 progress: bool = True, device: str | torch.device | None = None,
                 quantize_output: bool | None = None):
        # Checked here too, so the error names the PTQ the user wrote rather than its Calibrate part.
        check_data(data, self.name)
        check_count(num_batches, "num_batches", self.name)
        self.parts: list[Pass] = [
            InsertObservers(backend, config, bits, per_channel, quantize_output),
            Calibrate(data, num_batches, progress, device),
            Lower(backend),
        ]
