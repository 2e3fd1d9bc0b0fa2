"""Benchmarks: ``python -m tools.bench.<name>`` writes its section of BENCHMARKS.md."""
