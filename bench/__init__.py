"""Benchmarks and studies, run as scripts (``python bench/run.py``); results in
``bench/results/``."""
