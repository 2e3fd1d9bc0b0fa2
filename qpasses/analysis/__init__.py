"""Measurements: fidelity metrics, size, latency."""
