"""Benchmarks of sam_eos against the physical floor and peer implementations.

Run all of them and regenerate ``benchmarks/RESULTS.md`` with
``.venv/bin/python -m benchmarks.run_all``; each ``bench_*.py`` also runs
alone (``python -m benchmarks.bench_sharpness --quick``).
"""
