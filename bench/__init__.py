"""Benchmarks that print figures side by side with a peer: `python -m bench.NAME`."""
