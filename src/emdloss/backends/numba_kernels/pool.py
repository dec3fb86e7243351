"""Runs a serial kernel over a batch's rows, split across threads when the batch is big enough to pay for it.

The kernels are numba functions compiled without ``parallel=True`` and with ``nogil=True``: ``kernel(first,
end, *args)`` does rows (or row blocks) ``[first, end)`` on the calling thread. numba's parallel loops were
dropped for three measured reasons: the parallel loop compiles its body a second time (a third of a kernel's
first-call time), each call wakes numba's own worker pool next to torch's (the cost that made small batches
3x cross-entropy), and that pool is not fork-safe. Here a batch of at least :data:`PARALLEL_MIN_WORK` numbers
is cut in ``torch.get_num_threads()`` equal chunks: the calling thread runs the first, a persistent pool of
worker threads the others (the kernels release the GIL, so they run at once). Rows are independent, so the
results do not depend on the split.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

#: Smallest batch (in numbers: rows x (classes + internal nodes)) that is split across threads. Below it a
#: batch takes tens of microseconds, the order of handing work to another thread and waiting for it.
PARALLEL_MIN_WORK = 1 << 15

_lock = threading.Lock()
_pool: dict[str, object] = {"pid": None, "workers": 0, "executor": None}


def threads() -> int:
    """Threads the kernels use: as many as torch does (``torch.set_num_threads`` governs both)."""
    import torch

    return max(1, torch.get_num_threads())


def _executor(workers: int) -> ThreadPoolExecutor:
    """The worker pool, made (again) when it is too small or this is a forked child (which has no threads)."""
    with _lock:
        executor = _pool["executor"]
        if _pool["pid"] != os.getpid() or int(_pool["workers"]) < workers:  # type: ignore[call-overload]
            if executor is not None and _pool["pid"] == os.getpid():
                executor.shutdown(wait=False)  # type: ignore[attr-defined]
            executor = ThreadPoolExecutor(workers, thread_name_prefix="emdloss-kernel")
            _pool.update(pid=os.getpid(), workers=workers, executor=executor)
        return executor  # type: ignore[return-value]


def run_rows(kernel: Callable[..., None], n_units: int, work: int, *args: object) -> None:
    """``kernel(first, end, *args)`` over ``[0, n_units)``: in one call on this thread when ``work`` (the
    batch's size in numbers) is below :data:`PARALLEL_MIN_WORK` or torch uses one thread, else in
    ``threads()`` chunks at once. An exception in any chunk is raised here, after every chunk has ended."""
    t = min(threads(), n_units)
    if t <= 1 or work < PARALLEL_MIN_WORK:
        kernel(0, n_units, *args)
        return
    bounds = [n_units * k // t for k in range(t + 1)]
    futures = [_executor(t - 1).submit(kernel, bounds[k], bounds[k + 1], *args) for k in range(1, t)]
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        wait(futures)  # the workers write into the caller's arrays: never return before they are done
    for future in futures:
        future.result()
