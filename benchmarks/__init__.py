"""Benchmarks for the course's heavy code paths (run as ``python -m benchmarks.<name>``)."""
