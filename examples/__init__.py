"""Runnable examples for syncbn; `examples.models` holds the small models they (and benchmarks) share."""
