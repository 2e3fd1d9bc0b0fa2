"""Loading models saved with ``torch.save(qmodel, path)``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qpasses.errors import InputError, one_line
from qpasses.quant.state import existing_state


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model ``torch.save(qmodel, path)`` wrote: a quantized ``GraphModule`` ready to run, with the state
    qpasses keeps on it (:mod:`qpasses.quant.state`: node names, properties, the QAT annotation ``convert`` needs).

    A whole saved module is a pickle, which ``torch.load``'s default ``weights_only=True`` refuses; this
    loads it with ``weights_only=False``. **Unpickling runs code named in the file: load only files you
    trust** (your own, or from a source you would run code from). To share weights with untrusted parties,
    save ``qmodel.state_dict()`` instead and rebuild the model with qpasses before ``load_state_dict``.

    Raises :class:`InputError` (one line) for a missing file or one that holds no ``nn.Module``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cannot load {path}: {'it is a folder' if path.is_dir() else 'no such file'}")
    try:
        model = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise InputError(f"cannot load {path}: {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{path} holds a {type(model).__name__}, not a model saved with torch.save(qmodel, path)")
    existing_state(model)  # a graph module gets its node names and quantization metadata back
    return model
