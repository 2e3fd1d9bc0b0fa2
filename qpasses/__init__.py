"""qpasses: a quantization compiler for PyTorch.

``PassManager([FuseBN(), ReplaceFunctional()]).run(model, example_inputs)`` traces ``model`` into a
``torch.fx.GraphModule``, runs the passes in a verified order, and returns the rewritten module.
"""

from qpasses.errors import InputError, PassError, PlanError, QPassesError, TraceError, VerificationError
from qpasses.graph import to_networkx, trace
from qpasses.passes.manager import PassManager
from qpasses.qat import convert, disable_fake_quant, enable_fake_quant, freeze_bn_stats, freeze_observers
from qpasses.quant.spec import QuantConfig, QuantSpec
from qpasses.serialization import load

__all__ = [
    "InputError",
    "PassError",
    "PassManager",
    "PlanError",
    "QPassesError",
    "QuantConfig",
    "QuantSpec",
    "TraceError",
    "VerificationError",
    "convert",
    "disable_fake_quant",
    "enable_fake_quant",
    "freeze_bn_stats",
    "freeze_observers",
    "load",
    "to_networkx",
    "trace",
]
__version__ = "0.1.0"
