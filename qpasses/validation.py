"""Argument checks shared by the API's entry points, run before any work starts.

Each check raises :class:`qpasses.errors.InputError` with one line naming the argument and what to pass
instead, so a bad model, bad data or a bad count fails in the constructor or at the start of ``run``,
not after calibration with a deep torch error.
"""

from __future__ import annotations

import numbers
import os
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses.errors import InputError


def check_model(model: Any, owner: str) -> nn.Module:
    """``model`` as a usable float32 ``nn.Module``: not None or a function, not on the meta device, not half."""
    if not isinstance(model, nn.Module):
        hint = " (wrap a function in an nn.Module whose forward calls it)" if callable(model) else ""
        raise InputError(f"{owner} needs a torch.nn.Module, got {_kind(model)}{hint}")
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise InputError(f"{owner}: {kind} '{name}' is on the meta device and holds no values; materialize "
                                 f"the model first (model.to_empty(device='cpu'), then load_state_dict)")
            # Parameters only: buffers may be float64 on purpose (qpasses' histogram observers are).
            if kind == "parameter" and tensor.is_floating_point() and tensor.dtype != torch.float32:
                raise InputError(f"{owner}: {kind} '{name}' is {tensor.dtype}; qpasses calibrates and quantizes "
                                 f"float32 models: pass model.float() (and float32 inputs)")
    return model


def check_float_model(model: nn.Module, owner: str) -> None:
    """Refuse a model that already runs int8 kernels (lowered by qpasses or by torch.ao): its passes need the float
    model, and on a lowered one they would fail deep inside, or quantize the dequantized values a second time."""
    for name, module in model.named_modules():
        if isinstance(module, FloatFunctional):  # torch.ao's float arithmetic module, which qpasses quantizes
            continue
        if any(cls.__module__.startswith("torch.ao.nn.quantized") for cls in type(module).__mro__):
            where = f"module '{name}'" if name else "the model"
            raise InputError(f"{owner}: {where} is already quantized ({type(module).__name__}, an int8 kernel); "
                             f"run the pipeline on the float model it came from")


def as_input_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` (a tensor or a tuple/list of them) as a tuple; floating tensors must be float32."""
    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple = (example_inputs,)
    elif isinstance(example_inputs, list | tuple):
        inputs = tuple(example_inputs)
    else:
        raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {_kind(example_inputs)}")
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise InputError(f"example input {i} is on the meta device and holds no values; pass real data")
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            raise InputError(f"example input {i} is {value.dtype}; qpasses runs float32 models: pass "
                             f"it as x.float()")
    return inputs


def check_data(data: Any, owner: str, optional: bool = False) -> Iterable | None:
    """Calibration ``data``: an iterable of batches (a list of tensors, of (inputs, labels) tuples, a DataLoader)."""
    if data is None and optional:
        return None
    if data is None or isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
        raise InputError(f"{owner} needs calibration data as an iterable of batches (a list of tensors or a "
                         f"DataLoader), got {_kind(data)}")
    return data


def check_count(value: Any, name: str, owner: str, optional: bool = True) -> int | None:
    """A count such as ``num_batches`` or ``iterations``: a positive int (or None where ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise InputError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return int(value)


def check_out_path(out: Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, or a missing or read-only
    parent folder (``os.access`` also reports a read-only file system)."""
    if out.is_dir():
        raise InputError(f"{flag} {out}: is a folder; give a file name inside it, e.g. {out / ('out' + out.suffix)}")
    if not out.parent.is_dir():
        raise InputError(f"{flag} {out}: folder '{out.parent}' does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{flag} {out}: cannot write there (read-only); choose a writable folder")
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if callable(value) and not isinstance(value, type):
        return f"the {type(value).__name__} {getattr(value, '__qualname__', '')}".rstrip()
    return f"{type(value).__name__} {reprlib.repr(value)}"
