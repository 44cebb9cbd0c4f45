"""Benchmarks of the plugins against reference implementations (run each with ``python -m``)."""
