"""Compiles the kernels' parallel twins off the calling thread, so that a big batch's first call waits only for
its serial kernel.

numba takes several seconds longer to compile a kernel's ``parallel=True`` twin (:mod:`.threads`) than the
serial kernel alone: on a 2-core VM, 9.7 s instead of 5.0 s for the first call of a 64 x 10^4 chain, because the
twin's module carries the serial kernel's code and LLVM optimises it again as part of the parallel loop. So
the first big batch of each variant runs on the calling thread, then its twin compiles (or loads from numba's
disk cache) in a background thread, and later batches take the twin once it is ready. The numbers do not
depend on which path ran a call: the twin calls the same compiled serial code on each row's block, and every
reduction over rows happens after the kernel (``tests/test_first_use.py`` checks the two paths bit for bit for
each kernel variant).

Two details keep this safe:

- **fork**: numba compiles under a process-wide lock; a fork while a background compile held it would leave
  the child's copy locked for good. :func:`wait` runs before every ``os.fork`` (``os.register_at_fork``), so a
  fork in the first seconds after a first call waits for the compile instead.
- **exit**: the compiling thread is not a daemon. A process that ends right after its first call waits for
  the compile to finish (numba caches the result for the next process) rather than tearing down the
  interpreter under LLVM.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable

logger = logging.getLogger("emdloss")

_ready: set[Hashable] = set()
_pending: dict[Hashable, threading.Thread] = {}
_failed: set[Hashable] = set()
_lock = threading.Lock()


def _is_dispatcher(function: Callable[..., None]) -> bool:
    """Whether ``function`` is a numba dispatcher (it is a plain function under ``NUMBA_DISABLE_JIT``)."""
    from numba.core.dispatcher import Dispatcher

    return isinstance(function, Dispatcher)


def ready(key: Hashable, parallel: Callable[..., None]) -> bool:
    """Whether the twin ``parallel`` has been compiled for the variant ``key`` in this process (always true for
    a function that numba does not compile)."""
    return key in _ready or not _is_dispatcher(parallel)


def compile_later(key: Hashable, parallel: Callable[..., None], args: tuple[object, ...]) -> None:
    """Start compiling ``parallel`` for the types of ``args`` in a background thread, unless that is done, under
    way, or failed before (the calls then stay on the serial kernel). Call it after the serial kernel of the
    same call has run: numba's compiler lock would otherwise make that first call wait for the twin too."""
    with _lock:
        if key in _ready or key in _pending or key in _failed:
            return
        signature = tuple(parallel.typeof_pyval(a) for a in args)  # type: ignore[attr-defined]
        thread = threading.Thread(
            target=_compile, args=(key, parallel, signature), name="emdloss-kernel-compile", daemon=False
        )
        _pending[key] = thread
        thread.start()


def _compile(key: Hashable, parallel: Callable[..., None], signature: tuple[object, ...]) -> None:
    outcome = _ready
    try:
        parallel.compile(signature)  # type: ignore[attr-defined]
    except Exception as exc:  # a twin that cannot compile leaves its variant on the serial kernel
        logger.debug("emdloss: the parallel kernel did not compile (%s); batches stay on one thread", exc)
        outcome = _failed
    with _lock:
        outcome.add(key)
        del _pending[key]


def wait(timeout: float | None = None) -> None:
    """Block until the background compiles under way have finished (or ``timeout`` seconds have passed)."""
    with _lock:
        threads = list(_pending.values())
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=wait)
