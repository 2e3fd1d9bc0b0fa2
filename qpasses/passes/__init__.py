"""Passes: one file each. Import them from here."""

from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.fuse_bn import FuseBN
from qpasses.passes.manager import PassManager, Plan, Report
from qpasses.passes.replace_functional import ReplaceFunctional

__all__ = [
    "FuseBN",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Plan",
    "ReplaceFunctional",
    "Report",
    "Stage",
]
