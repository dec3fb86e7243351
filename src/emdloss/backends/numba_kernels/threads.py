"""Runs a kernel over a batch's rows: on the calling thread for small batches, else through numba's parallel loop.

Each kernel is a serial numba function, ``kernel(first, end, *args)`` over rows (or row blocks) ``[first,
end)``, with a thin parallel twin ``parallel(n_units, threads, *args)`` that cuts ``[0, n_units)`` into one chunk
per thread in a ``prange`` loop and calls the serial kernel on each (so both paths run the same compiled
per-row code, and the results do not depend on the path or the thread count). The twins spell out the kernels'
arguments: with ``*args`` a cold first call compiled for 9.5-10.2 s instead of 7.1-7.3 s. Below
:data:`PARALLEL_MIN_WORK` numbers a batch stays on the calling thread: waking numba's workers costs more than
such a batch (it made 64 x 10 batches cost 3x cross-entropy), and the first call of a small batch compiles
only the serial kernel. A big batch's first call does not wait for its twin either: it runs serially while the
twin compiles in the background (:mod:`.background_compile`). Measured alternative, dropped: a Python thread
pool around the serial kernels gained nothing at 256 x 1,000 on this 2-core VM (each of the two chunks ran 1.5x
slower side by side), where numba's OpenMP workers do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numba
import torch

from . import background_compile, compile_notice

#: Smallest batch (in numbers: rows x (classes + internal nodes)) that goes through the parallel twin.
PARALLEL_MIN_WORK = 1 << 15


def threads() -> int:
    """Threads the kernels use: as many as torch does (``torch.set_num_threads`` governs both), at most
    numba's pool size."""
    pool_size = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # set from the environment at import
    return max(1, min(torch.get_num_threads(), pool_size))


def run_rows(
    kernel: Callable[..., None],
    parallel: Callable[..., None],
    n_units: int,
    work: int,
    *args: object,
    variant: Hashable = None,
) -> None:
    """``kernel(0, n_units, *args)`` when ``work`` (the batch's size in numbers) is below
    :data:`PARALLEL_MIN_WORK` or torch uses one thread, else ``parallel(n_units, threads, *args)`` once that
    twin is compiled for ``variant`` (what the arguments' types compile: dtype, target kind, ...); until then the
    serial kernel runs and the twin compiles in the background (:mod:`.background_compile`). The first call
    of each function and variant in a process may log the compile notice (:mod:`.compile_notice`)."""
    t = min(threads(), n_units) if work >= PARALLEL_MIN_WORK else 1  # small batches never ask torch
    key = (parallel, variant)
    if t > 1 and background_compile.ready(key, parallel):
        follow_torch_threads(t)
        compile_notice.call(key, parallel, n_units, t, *args)
        return
    compile_notice.call((kernel, variant), kernel, 0, n_units, *args)
    if t > 1:
        background_compile.compile_later(key, parallel, (n_units, t, *args))


def follow_torch_threads(wanted: int) -> None:
    """Run numba's parallel loops on ``wanted`` threads. ``numba.get_num_threads`` also (re)registers this
    process with numba's OpenMP layer, which otherwise terminates a forked child whose parent ran a parallel
    region: keep that call first (``tests/test_reliability.py`` forks after use)."""
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
