"""A one-line notice when a fused kernel's first call in a process is compiling for longer than a moment.

numba compiles each kernel variant (chain or tree block, rho class, dtype) on its first use and caches it on
disk; a compile takes a few seconds, a cache load a fraction of one. The first call of each variant in a
process starts a timer: if that call is still running after :data:`NOTICE_AFTER_S`, one line goes to the
``emdloss`` logger (printed on stderr by default; ``logging.getLogger("emdloss").setLevel(logging.ERROR)``
silences it). Later calls of the variant pay only a set lookup.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable

#: Seconds a first call may take before the notice is logged.
NOTICE_AFTER_S = 1.5

logger = logging.getLogger("emdloss")
_started: set[Hashable] = set()


def cache_location() -> str:
    """Where numba keeps the compiled kernels: ``NUMBA_CACHE_DIR`` when set, else a ``__pycache__`` folder
    beside the kernels' source files, or numba's per-user cache folder when that one is read-only."""
    return os.environ.get("NUMBA_CACHE_DIR") or "numba's default (__pycache__ beside emdloss, else the user cache)"


def _notice() -> None:
    logger.warning(
        "emdloss: compiling the fused CPU kernel for this kind of call (first use; a few seconds, once: numba "
        "caches it in %s)",
        cache_location(),
    )


def call(key: Hashable, function: Callable[..., None], *args: object) -> None:
    """``function(*args)``; the first time ``key`` is seen in this process, log the notice if the call is still
    running after :data:`NOTICE_AFTER_S` seconds. (Later calls pay one set lookup: this sits on every kernel
    call, where a context manager's cost showed on small batches.)"""
    if key in _started:
        function(*args)
        return
    _started.add(key)
    timer = threading.Timer(NOTICE_AFTER_S, _notice)
    timer.daemon = True
    timer.start()
    try:
        function(*args)
    finally:
        timer.cancel()
