"""Benchmark scripts (each runnable as `python benchmarks/NAME.py` or through `llava-bench`)."""
