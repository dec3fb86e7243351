"""Kernels that take one row at a time: the tree and chain sweeps, and the distance-matrix kernel for hard
targets with rho = 1. Used for fewer than LANES rows and for small batches of huge trees (see
:func:`.lane_kernels.lanes_pay_off`), and whenever the lane kernels cannot be compiled.

Per row, with ``slot[j]`` the internal node that receives class j's mass (the class itself when it is
internal, else its parent) and internal nodes numbered in DFS pre-order (:mod:`.tree_arrays`):

    M[slot[j]] += d_j                         for every class j
    M[parent[k]] += M[k]                      for k = I-1 .. 1       (subtree masses, children first)
    L = sum_j leafw_j |d_j|^rho + sum_k w_k |M_k|^rho
    G[k] = G[parent[k]] + h(M_k, w_k)         for k = 1 .. I-1       (sum of h over the path to the root)
    dL/dp_j = g_j = G[slot[j]] + h(d_j, leafw_j),     h(f, w) = rho w sign(f) |f|^(rho-1)
    dL/dx_j = p_j (g_j - <p, g>)              through the softmax

Sums run in float64 scalars. Each kernel does the rows ``[first, end)`` on the calling thread; :mod:`.threads`
splits a batch across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .row_ops import BAD_LABEL, IGNORED, _cost, _dcost, _finish_gradient, _label, _probabilities, _skip_row
from .simd import FASTMATH, kernel_njit


@njit(inline="always")
def _chain_row(p, q, qi, label, spacing, rho, g):  # pragma: no cover
    """Loss of one row; g (C,) <- dL/dp. Flows are suffix sums S_k = sum_{j >= k} d_j (k = 1..C-1, across the
    edge between classes k-1 and k, of length spacing[k]) and dL/dp_j = sum_{k <= j} h(S_k)."""
    n_cls = p.shape[0]
    suffix = 0.0
    total = 0.0
    for k in range(n_cls - 1, 0, -1):
        suffix += float(p[k]) - float(q[qi, k]) - (1.0 if k == label else 0.0)
        total += _cost(suffix, spacing[k], rho)
        if g.shape[0]:
            g[k] = _dcost(suffix, spacing[k], rho)
    if g.shape[0]:
        g[0] = 0.0
        for k in range(1, n_cls):
            g[k] += g[k - 1]
    return total


@njit(inline="always")
def _tree_row(p, q, qi, label, slot, leaf_w, parent, weight, rho, mass, g):  # pragma: no cover
    """Loss of one row; g (C,) <- dL/dp. The four sweeps of the module docstring."""
    n_cls = p.shape[0]
    n_int = parent.shape[0]
    mass[:] = 0.0
    total = 0.0
    for j in range(n_cls):
        d = float(p[j]) - float(q[qi, j]) - (1.0 if j == label else 0.0)
        mass[slot[j]] += d
        total += _cost(d, leaf_w[j], rho)
    for k in range(n_int - 1, 0, -1):
        mass[parent[k]] += mass[k]
    mass[0] = 0.0  # mass[k] becomes G[k], the sum of dcost over the edges from node k up to the root
    for k in range(1, n_int):
        f = mass[k]
        total += _cost(f, weight[k], rho)
        mass[k] = mass[parent[k]] + _dcost(f, weight[k], rho)
    if g.shape[0]:
        for j in range(n_cls):
            d = float(p[j]) - float(q[qi, j]) - (1.0 if j == label else 0.0)
            g[j] = mass[slot[j]] + _dcost(d, leaf_w[j], rho)
    return total


def sweep_markers(chain: bool) -> tuple[bool | None, bool | None]:
    """``(use_chain, use_tree)`` for :func:`_rows_kernel`: True for the sweep that applies, None for the other.
    numba prunes ``if marker is not None`` branches when the marker is None, so a call compiles one sweep (a
    cold first call of a 10^4-class chain: 3.5 s instead of 4.9 s)."""
    return (True, None) if chain else (None, True)


@kernel_njit(cache=True, nogil=True, fastmath=FASTMATH, no_cfunc_wrapper=True)
def _rows_kernel(
    first,
    end,
    x,
    q,
    y,
    ignore_index,
    from_logits,
    need_grad,
    scale,
    loss,
    grad,
    chain,
    slot,
    leaf_w,
    parent,
    weight,
    rho,
    use_chain,
    use_tree,
):  # pragma: no cover
    """Rows ``[first, end)``, one at a time. For a chain ``weight`` holds the spacing. One of ``use_chain`` and
    ``use_tree`` is None (:func:`sweep_markers`), so each signature compiles one of the two sweeps."""
    n_cls = x.shape[1]
    p = np.empty(n_cls, dtype=x.dtype)
    g = np.empty(n_cls if need_grad else 0, dtype=np.float64)
    mass = np.empty(0 if chain else parent.shape[0], dtype=np.float64)
    for i in range(first, end):
        label = _label(y, i, n_cls, ignore_index)
        if label in (IGNORED, BAD_LABEL):
            _skip_row(i, label, need_grad, loss, grad)
            continue
        qi = i if q.shape[0] > 1 else 0
        _probabilities(x, i, from_logits, p, 0)
        if use_chain is not None:
            loss[i] = _chain_row(p, q, qi, label, weight, rho, g)
        if use_tree is not None:
            loss[i] = _tree_row(p, q, qi, label, slot, leaf_w, parent, weight, rho, mass, g)
        if need_grad:
            _finish_gradient(p, 0, g, from_logits, scale, grad, i)


@kernel_njit(parallel=True, cache=True, nogil=True, no_cfunc_wrapper=True)
def _rows_parallel(
    n,
    threads,
    x,
    q,
    y,
    ignore_index,
    from_logits,
    need_grad,
    scale,
    loss,
    grad,
    chain,
    slot,
    leaf_w,
    parent,
    weight,
    rho,
    use_chain,
    use_tree,
):  # pragma: no cover
    """:func:`_rows_kernel` over rows ``[0, n)``, one chunk per thread (see :mod:`.threads`)."""
    for t in prange(threads):
        _rows_kernel(
            t * n // threads,
            (t + 1) * n // threads,
            x,
            q,
            y,
            ignore_index,
            from_logits,
            need_grad,
            scale,
            loss,
            grad,
            chain,
            slot,
            leaf_w,
            parent,
            weight,
            rho,
            use_chain,
            use_tree,
        )


# ---------------------------------------------------------------------- hard targets, rho = 1


@kernel_njit(cache=True, nogil=True, fastmath=FASTMATH, no_cfunc_wrapper=True)
def _distance_kernel(
    first, end, x, y, ignore_index, dist, depth, from_logits, need_grad, scale, loss, grad
):  # pragma: no cover
    """Hard targets, rho = 1, rows ``[first, end)``: loss_i = sum_j p_ij D[y_i, j], with the softmax fused in.

    dL/dp_j = D[y, j] - depth(y): the sum of w_e sign(f_e) over the edges above j, with the signs of
    interior flows (-1 on the path to y, +1 off it), the same subgradient as the reference backend.
    Through the softmax the constant cancels: dL/dx = p (D[y] - L).
    """
    n_cls = x.shape[1]
    p = np.empty(n_cls, dtype=x.dtype)
    for i in range(first, end):
        label = _label(y, i, n_cls, ignore_index)
        if label < 0:
            _skip_row(i, label, need_grad, loss, grad)
            continue
        row = dist[label]
        _probabilities(x, i, from_logits, p, 0)
        total = 0.0
        for j in range(n_cls):
            total += float(p[j]) * float(row[j])
        loss[i] = total
        if need_grad:
            if from_logits:
                for j in range(n_cls):
                    grad[i, j] = p[j] * (row[j] - total) * scale
            else:
                shift = depth[label]
                for j in range(n_cls):
                    grad[i, j] = (row[j] - shift) * scale


@kernel_njit(parallel=True, cache=True, nogil=True, no_cfunc_wrapper=True)
def _distance_parallel(
    n, threads, x, y, ignore_index, dist, depth, from_logits, need_grad, scale, loss, grad
):  # pragma: no cover
    """:func:`_distance_kernel` over rows ``[0, n)``, one chunk per thread (see :mod:`.threads`)."""
    for t in prange(threads):
        _distance_kernel(
            t * n // threads,
            (t + 1) * n // threads,
            x,
            y,
            ignore_index,
            dist,
            depth,
            from_logits,
            need_grad,
            scale,
            loss,
            grad,
        )
