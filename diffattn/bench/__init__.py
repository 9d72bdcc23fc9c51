"""Benchmarks (GPU): kernels now, transformer steps later."""
