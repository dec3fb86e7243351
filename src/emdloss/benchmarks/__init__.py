"""Benchmarks run by ``emdloss bench``."""
