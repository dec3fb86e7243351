"""emdloss_lab: the applications built on the :mod:`emdloss` library, shipped in the same distribution.

- :mod:`.cli`: the ``emdloss`` command (``demo``, ``bench``, ``experiment NAME``, ``train-imagenet``).
- :mod:`.experiments`: reproducible experiments and the demo, with their shared runner.
- :mod:`.bench`: the speed and memory benchmark and the fused-kernel profiler.
- :mod:`.data`: where the shared real data lives and the hierarchies read from it.
- :mod:`.synthetic`: random trees for tests, benchmarks and experiments.
- :mod:`.errors`: :class:`~.errors.UsageError`, the mistakes the command reports in one line (exit status 2).

The library never imports this package (a test checks it); this package uses only the library's public API
and its atomic-write helper.
"""
