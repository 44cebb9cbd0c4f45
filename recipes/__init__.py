"""Experiments, sweeps, benchmarks and the quickstart built on the ``plugins/`` user dir."""
