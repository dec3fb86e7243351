"""Row statistics for the input checks (:func:`emdloss._inputs.check_distribution`) on CPU arrays.

One vectorised pass over the rows on the calling thread: checking soft targets with torch reductions right before
a fused call left two sets of worker threads competing for the cores and cost more than the check itself, and a
parallel loop here would add its own compile (about a second) to every first call with soft targets for a pass
that is memory-bound anyway.
"""

from __future__ import annotations

import numpy as np

from .simd import FASTMATH, kernel_njit


@kernel_njit(cache=True, nogil=True, fastmath=FASTMATH, no_cfunc_wrapper=True)
def _row_sums_and_negatives(q, sums, negatives):  # pragma: no cover
    """Row sums of q (in float64) and counts of negative entries: vectorised loops (a running minimum would
    not be)."""
    for i in range(q.shape[0]):
        s = 0.0  # float64: the sum's own rounding stays far below the tolerance, whatever C
        neg = 0.0
        for j in range(q.shape[1]):
            s += q[i, j]
            neg += 1.0 if q[i, j] < 0 else 0.0
        sums[i] = s
        negatives[i] = neg


def distribution_stats(q: np.ndarray) -> tuple[bool, float, float]:
    """(all finite, smallest entry, largest |row sum - 1|) of ``q`` (N, C) float32/float64; the smallest entry
    only when it is negative, else 0."""
    if q.size == 0:
        return True, 0.0, 0.0
    sums = np.empty(q.shape[0], dtype=np.float64)
    negatives = np.empty(q.shape[0], dtype=np.float64)
    _row_sums_and_negatives(q, sums, negatives)
    if not np.isfinite(sums).all():  # a NaN or inf anywhere makes its row's sum NaN or inf
        return False, 0.0, 0.0
    return True, float(q.min()) if negatives.any() else 0.0, float(np.abs(sums - 1).max())
