"""Benchmarks: numbers, not timed tests. :mod:`.harness` holds what any benchmark can reuse
(time caps, peak memory in a child process, FLOP counting, atomic outputs); each other module
is one benchmark, run as ``python -m recipes.benchmarks.<name>`` from the repository root."""
