"""Reproducible experiments: one module per experiment, each with ``add_arguments(parser)`` and ``run(args)``.

Shared machinery (seeds, progress, atomic writes, checkpoints, reports) lives in :mod:`.runner`.
"""
