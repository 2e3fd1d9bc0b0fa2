"""Benchmarks: each module has ``main(argv: list[str] | None = None) -> int`` and writes its section of
BENCHMARKS.md (``common.write_section``); ``qpasses bench NAME`` runs one."""
