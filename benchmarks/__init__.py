"""Benchmarks (not tests): each module runs from the repository root as `python -m benchmarks.bench_x`
and writes its figures under benchmarks/results/ (README.md reads them)."""
