"""Passes: one file each. Import them from here."""

from qpasses.passes.adaround import AdaRound
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.bias_correction import BiasCorrection
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.cle import CLE
from qpasses.passes.dynamic_quant import DynamicQuant
from qpasses.passes.fold_bn_for_training import FoldBNForTraining
from qpasses.passes.fuse_bn import FuseBN
from qpasses.passes.high_bias_absorption import HighBiasAbsorption
from qpasses.passes.insert_fake_quant import InsertFakeQuant
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.lower import Lower
from qpasses.passes.manager import PassManager, Plan, Report
from qpasses.passes.mixed_precision import MixedPrecision
from qpasses.passes.ptq import PTQ
from qpasses.passes.qat import QAT
from qpasses.passes.reference import Reference
from qpasses.passes.replace_functional import ReplaceFunctional

__all__ = [
    "AdaRound",
    "CLE",
    "PTQ",
    "QAT",
    "BiasCorrection",
    "Calibrate",
    "DynamicQuant",
    "FoldBNForTraining",
    "FuseBN",
    "HighBiasAbsorption",
    "InsertFakeQuant",
    "InsertObservers",
    "Lower",
    "MixedPrecision",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Plan",
    "Reference",
    "ReplaceFunctional",
    "Report",
    "Stage",
]
