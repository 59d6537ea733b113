"""Benchmarks of keras-glas: each prints its numbers and writes them as JSON."""
