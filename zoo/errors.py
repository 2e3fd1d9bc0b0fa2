"""Errors of the model zoo and the data loaders; each message says what to do next."""

from __future__ import annotations

from qpasses.errors import QPassesError


class ZooError(QPassesError):
    """Base class of the errors raised by ``zoo``."""


class UnknownName(ZooError, KeyError):
    """A model or dataset name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        # KeyError would show repr(message), quotes and escaped newlines included.
        return str(self.args[0])


class PretrainedUnavailable(ZooError):
    """Pretrained weights were asked for, but none are available offline."""


class DatasetNotFound(ZooError, FileNotFoundError):
    """A dataset's files are missing or not in the expected layout; the message shows the layout."""
