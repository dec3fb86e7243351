"""Per-row pieces shared by the one-row and the lane kernels: the per-edge cost and its derivative for each
exponent class, how a row's target is read, its softmax, and the gradient through the softmax.

All are ``inline="always"``: numba compiles them into each kernel that calls them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import FASTMATH, row_exp, row_max

# ---------------------------------------------------------------------- per-edge cost and its derivative
# One pair per exponent class; the lane kernel is compiled once per pair (no test of rho inside its loops,
# and rho = 1 and 2 avoid pow). The one-row kernel, for small batches, uses the generic pair.


@njit(inline="always")
def _cost_rho1(f, w, rho):  # pragma: no cover
    return w * abs(f)


@njit(inline="always")
def _dcost_rho1(f, w, rho):  # pragma: no cover
    return w * _sign(f)


@njit(inline="always")
def _sign(f):  # pragma: no cover
    """sign(f) in {-1, 0, 1} without branches (flows' signs are random, branches would mispredict): any
    |f| >= 1e-308 saturates the clamp; float32-derived flows are 0 or at least 1.4e-45 * 1e308.

    Written as the selects numba's ``max(min(...), ...)`` lowers to (NaN passes through), because the builtins
    compile a generic overload of their own: 0.2-0.3 s of every kernel's first compile."""
    t = f * 1e308
    m = 1.0 if t > 1.0 else t
    return -1.0 if m < -1.0 else m


@njit(inline="always")
def _cost_rho2(f, w, rho):  # pragma: no cover
    return w * f * f


@njit(inline="always")
def _dcost_rho2(f, w, rho):  # pragma: no cover
    return 2.0 * w * f


@njit(inline="always")
def _cost_pow(f, w, rho):  # pragma: no cover
    return w * abs(f) ** rho


@njit(inline="always")
def _dcost_pow(f, w, rho):  # pragma: no cover
    if f == 0.0:
        return 0.0
    return rho * w * _sign(f) * abs(f) ** (rho - 1.0)


@njit(inline="always")
def _by_rho(f, w, rho, for_rho1, for_rho2, for_pow):  # pragma: no cover
    """The member of a (rho = 1, rho = 2, any rho) triple that applies to ``rho``, applied to (f, w)."""
    if rho == 1.0:
        return for_rho1(f, w, rho)
    if rho == 2.0:
        return for_rho2(f, w, rho)
    return for_pow(f, w, rho)


@njit(inline="always")
def _cost(f, w, rho):  # pragma: no cover
    """``w |f|^rho``, any rho."""
    return _by_rho(f, w, rho, _cost_rho1, _cost_rho2, _cost_pow)


@njit(inline="always")
def _dcost(f, w, rho):  # pragma: no cover
    """``d/df w |f|^rho = rho w sign(f) |f|^(rho-1)``, 0 at f = 0 (the reference's subgradient), any rho."""
    return _by_rho(f, w, rho, _dcost_rho1, _dcost_rho2, _dcost_pow)


# ---------------------------------------------------------------------- labels and probabilities
# Targets reach the kernels in one form: a target distribution row ``q[qi]`` minus a one-hot at ``label``.
# Soft targets: q (N, C) and label NO_LABEL. Class indices: q a single row of zeros (qi = 0) and label y_i
# (the lane kernel adds their -1 after its class pass instead of reading them per class).

IGNORED, BAD_LABEL, NO_LABEL = -1, -2, -3  # _label's answers besides a class index


@njit(inline="always")
def _label(y, i, n_cls, ignore_index):  # pragma: no cover
    """Row i's class label, IGNORED (ignore_index), BAD_LABEL (outside [0, C)), or NO_LABEL (soft targets)."""
    if y.shape[0] == 0:
        return NO_LABEL
    yi = y[i]
    if yi == ignore_index:
        return IGNORED
    if yi < 0 or yi >= n_cls:
        return BAD_LABEL
    return yi


@njit(inline="always")
def _skip_row(i, label, need_grad, loss, grad):  # pragma: no cover
    """An ignored row counts 0 with no gradient; a bad label gets a NaN loss, which the caller reports."""
    loss[i] = 0.0 if label == IGNORED else np.nan
    if need_grad:
        for j in range(grad.shape[1]):
            grad[i, j] = 0.0


@njit(inline="always", fastmath=FASTMATH)
def _probabilities(x, i, from_logits, out, base):  # pragma: no cover
    """``out[base : base + C]`` = softmax of row i of x (or the row itself when not ``from_logits``).

    NaN or +inf logits make the row NaN (hence its loss); -inf logits get probability 0.
    """
    n_cls = x.shape[1]
    if not from_logits:
        for j in range(n_cls):
            out[base + j] = x[i, j]
        return
    m = row_max(x[i])
    s = m - m  # zero of x's dtype: the sum runs in it, vectorised, as torch.softmax's does
    for j in range(n_cls):
        e = row_exp(x[i, j] - m)
        out[base + j] = e
        s += e
    inv = 1 / s
    for j in range(n_cls):
        out[base + j] = out[base + j] * inv


@njit(inline="always", fastmath=FASTMATH)
def _finish_gradient(p, base, g, from_logits, scale, grad, i):  # pragma: no cover
    """``grad[i]`` <- ``scale * p * (g - <p, g>)`` with g = dL/dp (C,), through the softmax when ``from_logits``,
    else ``scale * g``. (``scale``: 1 / kept rows for reduction="mean".)"""
    n_cls = grad.shape[1]
    if from_logits:
        dot = 0.0
        for j in range(n_cls):
            dot += float(p[base + j]) * float(g[j])
        for j in range(n_cls):
            grad[i, j] = p[base + j] * (g[j] - dot) * scale
    else:
        for j in range(n_cls):
            grad[i, j] = g[j] * scale
