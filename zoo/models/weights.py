"""Loading weights from local files; the zoo never downloads any."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qpasses_zoo.errors import PretrainedUnavailable


def read_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """A state_dict saved with ``torch.save``; a checkpoint holding one under ``"state_dict"`` also works."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    # weights_only: a weights file must not be able to run code when it is loaded.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return loaded


def load_local_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load ``path`` into ``model`` strictly, naming the model and the file if the keys do not match."""
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as exc:
        raise RuntimeError(f"weights in {path} do not fit zoo model {name!r}: {exc}") from exc


def torchvision_weights_unavailable(name: str, weights_enum: type) -> PretrainedUnavailable:
    """The error for ``pretrained=True`` on a torchvision model: where to get the file, how to load it."""
    default = weights_enum.DEFAULT
    filename = default.url.rsplit("/", 1)[-1]
    return PretrainedUnavailable(
        f"torchvision's pretrained weights for {name!r} cannot be downloaded here (qpasses never downloads).\n"
        f"  fetch {type(default).__name__}.{default.name} on a machine with internet access ({default.url}),\n"
        f"  then load the local file: zoo.get({name!r}, weights_path='path/to/{filename}')"
    )


def no_pretrained_weights(name: str) -> PretrainedUnavailable:
    """The error for ``pretrained=True`` on a model that has no published weights."""
    return PretrainedUnavailable(
        f"no pretrained weights exist for zoo model {name!r}; train it (e.g. on qpasses_zoo.data) and save its "
        f"state_dict, then load it with zoo.get({name!r}, weights_path='path/to/state_dict.pt')"
    )
