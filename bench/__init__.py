"""Benchmarks of the Refinery engine; see bench/README.md."""
