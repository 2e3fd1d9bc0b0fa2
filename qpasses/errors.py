"""Typed errors. Each one says what went wrong, where, and what to do about it."""

from __future__ import annotations


class QPassesError(Exception):
    """Base class of every error qpasses raises on purpose."""


class InputError(QPassesError, ValueError, TypeError):
    """A bad argument, refused before any work starts: a model that is not a usable ``nn.Module``, example
    inputs it cannot run on, calibration data that is not an iterable of batches, a count that is not a
    positive int.

    Also a ``ValueError`` and a ``TypeError``, so code that caught those from earlier versions still does.
    """


class TraceError(QPassesError):
    """The model could not be captured into a graph.

    ``module`` is the qualified name of the innermost submodule being traced when it failed
    ('' for the top-level forward), ``source`` the user's ``file:line``.
    """

    def __init__(self, message: str, module: str | None = None, source: str | None = None):
        super().__init__(message)
        self.module = module
        self.source = source


class PlanError(QPassesError):
    """A pipeline cannot be ordered: a missing prerequisite, a contradiction, a conflict.

    Raised by the PassManager before any pass runs.
    """


class PassError(QPassesError):
    """A pass failed, or its output failed verification.

    ``pass_name``, ``position`` (0-based, in the planned order), ``previous`` (names of the
    passes that ran before it) and ``node`` (the first offending node, when known).
    """

    def __init__(
        self,
        message: str,
        pass_name: str = "",
        position: int = -1,
        previous: tuple[str, ...] = (),
        node: str | None = None,
    ):
        super().__init__(message)
        self.pass_name = pass_name
        self.position = position
        self.previous = previous
        self.node = node


class GraphRunError(QPassesError):
    """Running a graph on example inputs failed at ``node`` (e.g. a kernel refused its arguments)."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class VerificationError(PassError):
    """A pass that claims to preserve the model's function changed it, or broke the graph."""


class ExportError(QPassesError):
    """A model cannot be exported (not lowered, or an op the target format cannot express)."""


class DeployError(QPassesError):
    """A deployment target (``qpasses.lower``) cannot give its runtime's int8 kernels: the runtime is missing
    (the message names the ``pip install``), or the runtime ran some quantized op in float (the message names it)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages, e.g. an expected folder layout, joined by '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


class TargetNotMetError(PassError):
    """``PTQ(target_sqnr=...)`` (or ``evaluate=``, ``max_drop=``): no step of the bounded search met the target;
    the message gives the best value reached and what to try."""
