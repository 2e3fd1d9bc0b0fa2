"""Quantization specs, the backend table, observers."""

from qpasses.quant.backends import BACKENDS, Backend, UnsupportedSpecError, get_backend
from qpasses.quant.observers import (
    CalibrationError,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qpasses.quant.spec import QuantConfig, QuantPair, QuantSpec, compute_qparams, int16_pair_sum_overflows

__all__ = [
    "BACKENDS",
    "Backend",
    "CalibrationError",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantConfig",
    "QuantPair",
    "QuantSpec",
    "UnsupportedSpecError",
    "compute_qparams",
    "get_backend",
    "int16_pair_sum_overflows",
    "make_observer",
]
