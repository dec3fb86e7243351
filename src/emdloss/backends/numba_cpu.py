"""Fused CPU backend: softmax, flows, loss and gradient of each row in one kernel call, parallel with numba.

The reference backend touches the whole (N, nodes) batch a dozen times; here each row is done while it
sits in cache. Only the tree's *internal* nodes need a buffer: a leaf class's edge carries exactly
``d_j = p_j - q_j``. Per row, with ``slot[j]`` the internal node that receives class j's mass (the class
itself when it is internal, else its parent) and internal nodes numbered in DFS pre-order:

    M[slot[j]] += d_j                         for every class j
    M[parent[k]] += M[k]                      for k = I-1 .. 1       (subtree masses, children first)
    L = sum_j leafw_j |d_j|^rho + sum_k w_k |M_k|^rho
    G[k] = G[parent[k]] + h(M_k, w_k)         for k = 1 .. I-1       (sum of h over the path to the root)
    dL/dp_j = g_j = G[slot[j]] + h(d_j, leafw_j),     h(f, w) = rho w sign(f) |f|^(rho-1)
    dL/dx_j = p_j (g_j - <p, g>)              through the softmax

Sums run in float64 scalars. Three kernels, chosen by :func:`tree_rows`:

- ``_lanes_kernel``: blocks of LANES = 8 rows, every per-node value one SIMD vector of lanes (see
  :mod:`.lanes`): one instruction per node and operation for eight rows, whose dependent adds overlap; the
  default.
- ``_rows_kernel``: one row at a time, for batches too small for the lanes' scratch to pay (``lanes_pay_off``).
- ``_distance_kernel``: hard targets with rho = 1 and a moderate number of classes, where the loss is
  ``sum_j p_j D[j, y]`` (the expected tree distance to the true class): one dot product per row with a
  cached distance matrix.

All three compute the softmax themselves (:func:`.simd.exp_f32` keeps it vectorised), read class indices raw
(``ignore_index`` rows: loss 0, gradient 0; out-of-range ones: loss NaN, for the caller to report) and write
the gradient times ``scale`` (the reduction's 1 / kept rows), so that the autograd Function around them does
no work of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ..tree import Tree
from .lanes import (
    LANES,
    lanes_abs,
    lanes_clamp_unit,
    lanes_columns,
    lanes_fill,
    lanes_load,
    lanes_map,
    lanes_one_hot,
    lanes_store,
    lanes_store_columns,
    lanes_to_tuple,
)
from .simd import FASTMATH, row_exp, row_max

#: Largest class count for which hard rho=1 targets use the cached C x C distance matrix (64 MiB float32).
DISTANCE_MATRIX_MAX_CLASSES = 4096


def padded_width(n_cls: int) -> int:
    """C rounded up to a multiple of LANES: the length of the class arrays below (see the lanes section)."""
    return -(-n_cls // LANES) * LANES


def _pad(values: np.ndarray, dtype: type) -> np.ndarray:
    out = np.zeros(padded_width(values.shape[0]), dtype=dtype)
    out[: values.shape[0]] = values
    return out


@dataclass(frozen=True)
class InternalTree:
    """The tree compressed to its internal nodes (see the module docstring). All arrays contiguous; the class
    arrays padded to ``padded_width(C)`` with classes at the root (slot 0) on edges of length 0."""

    slot: np.ndarray  # (W,) int64
    leaf_w: np.ndarray  # (W,) float64, 0 for internal classes
    parent: np.ndarray  # (I,) int64, -1 at index 0 (the root)
    weight: np.ndarray  # (I,) float64

    @staticmethod
    def from_tree(tree: Tree) -> InternalTree:
        n = tree.num_nodes
        is_internal = np.zeros(n, dtype=bool)
        is_internal[tree.parents[tree.parents >= 0]] = True
        is_internal[tree.root] = True
        internal = tree.preorder[is_internal[tree.preorder]]  # internal nodes in DFS pre-order
        index = np.full(n, -1, dtype=np.int64)
        index[internal] = np.arange(internal.size)
        parent = np.where(internal == tree.root, -1, index[np.maximum(tree.parents[internal], 0)])
        weight = np.where(internal == tree.root, 0.0, tree.weights[internal])
        cls = tree.classes
        cls_internal = is_internal[cls]
        slot = np.where(cls_internal, index[cls], index[np.maximum(tree.parents[cls], 0)])
        slot = np.where(cls == tree.root, 0, slot)
        leaf_w = np.where(cls_internal, 0.0, tree.weights[cls])
        return InternalTree(
            slot=_pad(slot, np.int64),
            leaf_w=_pad(leaf_w, np.float64),
            parent=np.ascontiguousarray(parent, dtype=np.int64),
            weight=np.ascontiguousarray(weight, dtype=np.float64),
        )

    @staticmethod
    def cached(tree: Tree) -> InternalTree:
        found = tree._derived.get("numba_internal")
        if found is None:
            found = InternalTree.from_tree(tree)
            tree._derived["numba_internal"] = found
        return found


def cached_chain_spacing(tree: Tree) -> np.ndarray:
    """(W,) float64, W = ``padded_width(C)``: entry k is the length of the edge between chain classes k-1 and
    k; 0 at k = 0 and in the padding."""
    found = tree._derived.get("numba_chain_spacing")
    if found is None:
        found = _pad(tree.weights[tree.classes], np.float64)
        found[0] = 0.0
        tree._derived["numba_chain_spacing"] = found
    return found


def cached_distance_rows(tree: Tree, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The tree's C x C distance matrix and the (C,) weighted depth of each class, in ``dtype``, cached."""
    key = ("numba_distance", np.dtype(dtype).str)
    found = tree._derived.get(key)
    if found is None:
        found = (
            np.ascontiguousarray(tree.distance_matrix(), dtype=dtype),
            np.ascontiguousarray(tree.depth()[tree.classes], dtype=dtype),
        )
        tree._derived[key] = found
    return found


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
    |f| >= 1e-308 saturates the clamp; float32-derived flows are 0 or at least 1.4e-45 * 1e308."""
    return max(min(f * 1e308, 1.0), -1.0)


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


# ---------------------------------------------------------------------- one row at a time
# For fewer than LANES rows, and for small batches of huge trees (see lanes_pay_off).


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


@njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _rows_kernel(x, q, y, ignore_index, from_logits, need_grad, scale, loss, grad, chain, slot, leaf_w, parent, weight, rho, threads):  # pragma: no cover
    """One row at a time, rows split in one chunk per thread. For a chain ``weight`` holds the spacing."""
    n, n_cls = x.shape
    chunks = min(n, threads)
    for t in prange(chunks):
        p = np.empty(n_cls, dtype=x.dtype)
        g = np.empty(n_cls if need_grad else 0, dtype=np.float64)
        mass = np.empty(0 if chain else parent.shape[0], dtype=np.float64)
        for i in range(t * n // chunks, (t + 1) * n // chunks):
            label = _label(y, i, n_cls, ignore_index)
            if label == IGNORED or label == BAD_LABEL:
                _skip_row(i, label, need_grad, loss, grad)
                continue
            qi = i if q.shape[0] > 1 else 0
            _probabilities(x, i, from_logits, p, 0)
            if chain:
                loss[i] = _chain_row(p, q, qi, label, weight, rho, g)
            else:
                loss[i] = _tree_row(p, q, qi, label, slot, leaf_w, parent, weight, rho, mass, g)
            if need_grad:
                _finish_gradient(p, 0, g, from_logits, scale, grad, i)


# ---------------------------------------------------------------------- LANES rows at a time
# The same sweeps over blocks of LANES rows, every per-node value one ``lanes`` vector (see .lanes). Classes
# go through in column blocks of LANES: an in-register transpose turns LANES rows x LANES classes of
# probabilities into LANES lanes values, and back for the gradient. The per-thread scratch rows (p, g) and
# the class arrays (slot, leaf_w, chain spacing) are padded to a multiple of LANES classes: padding classes
# have probability 0 and sit at the root on an edge of length 0, so they add nothing.

# Lane cost pairs: the scalar pairs above, one vector instruction per operation where there is one.


@njit(inline="always")
def _lanes_cost_rho1(f, w, rho):  # pragma: no cover
    return w * lanes_abs(f)


@njit(inline="always")
def _lanes_dcost_rho1(f, w, rho):  # pragma: no cover
    return w * lanes_clamp_unit(f * 1e308)  # _sign, lane by lane


@njit(inline="always")
def _lanes_cost_rho2(f, w, rho):  # pragma: no cover
    return w * (f * f)


@njit(inline="always")
def _lanes_dcost_rho2(f, w, rho):  # pragma: no cover
    return (2.0 * w) * f


@njit(inline="always")
def _lanes_cost_pow(f, w, rho):  # pragma: no cover
    return lanes_map(_cost_pow, f, w, rho)


@njit(inline="always")
def _lanes_dcost_pow(f, w, rho):  # pragma: no cover
    return lanes_map(_dcost_pow, f, w, rho)


@njit(inline="always")
def _row_offsets(stride):  # pragma: no cover
    return (0, stride, 2 * stride, 3 * stride, 4 * stride, 5 * stride, 6 * stride, 7 * stride)


@njit(inline="always")
def _target_columns(q_flat, q_offsets, jb, n_cls, tail):  # pragma: no cover
    """``lanes_columns`` of the soft targets (rows of ``n_cls``, not padded): the last, partial block through
    ``tail`` (LANES x LANES scratch), zero past ``n_cls``, so that no read leaves the array."""
    if jb + LANES <= n_cls:
        return lanes_columns(q_flat, q_offsets, jb)
    for l in range(LANES):
        for c in range(LANES):
            tail[l * LANES + c] = q_flat[q_offsets[l] + jb + c] if jb + c < n_cls else 0.0
    return lanes_columns(tail, _row_offsets(LANES), 0)


@njit(inline="always", fastmath=FASTMATH)
def _chain_block(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail, cost, dcost):  # pragma: no cover
    """Losses (a LANES tuple) of LANES rows whose probabilities are ``p[l * W : l * W + C]`` (W = the padded
    width, ``spacing.shape[0]``). With ``need_grad``, ``g[l * W + j]`` <- dL/dp_j of row l; ``h`` (W * LANES)
    is scratch. ``spacing[0]`` is 0: no edge below class 0."""
    width = spacing.shape[0]
    offsets = _row_offsets(width)
    suffix = lanes_fill(0.0)
    total = lanes_fill(0.0)
    soft = labels[0] == NO_LABEL
    for jb in range(width - LANES, -1, -LANES):
        cols = lanes_columns(p, offsets, jb)
        if soft:
            q_cols = _target_columns(q_flat, q_offsets, jb, n_cls, tail)
        for c in range(LANES - 1, -1, -1):
            k = jb + c
            suffix = suffix + (cols[c] - q_cols[c] if soft else cols[c] - lanes_one_hot(k, labels))
            total = total + cost(suffix, spacing[k], rho)
            if need_grad:
                lanes_store(h, k * LANES, dcost(suffix, spacing[k], rho))
    if need_grad:  # dL/dp_k = sum of h over the edges 1..k: a prefix sum
        acc = lanes_fill(0.0)
        for jb in range(0, width, LANES):
            g0 = acc + lanes_load(h, jb * LANES)
            g1 = g0 + lanes_load(h, (jb + 1) * LANES)
            g2 = g1 + lanes_load(h, (jb + 2) * LANES)
            g3 = g2 + lanes_load(h, (jb + 3) * LANES)
            g4 = g3 + lanes_load(h, (jb + 4) * LANES)
            g5 = g4 + lanes_load(h, (jb + 5) * LANES)
            g6 = g5 + lanes_load(h, (jb + 6) * LANES)
            acc = g6 + lanes_load(h, (jb + 7) * LANES)
            lanes_store_columns(g, offsets, jb, (g0, g1, g2, g3, g4, g5, g6, acc))
    return lanes_to_tuple(total)


@njit(inline="always", fastmath=FASTMATH)
def _path_gradient(h, mass, slot, j):  # pragma: no cover
    """dL/dp_j in lanes: the leaf edge's part plus G of the node above."""
    return lanes_load(h, j * LANES) + lanes_load(mass, slot[j] * LANES)


@njit(inline="always", fastmath=FASTMATH)
def _tree_block(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots, cost, dcost):  # pragma: no cover
    """Losses (a LANES tuple) of LANES rows whose probabilities are ``p[l * W : l * W + C]`` (W = the padded
    width, ``slot.shape[0]``). With ``need_grad``, ``g[l * W + j]`` <- dL/dp_j of row l. ``mass`` (I * LANES),
    ``h`` (W * LANES), ``tail`` (LANES * LANES) and ``dots`` (LANES) are scratch. A class-index target's -1
    is added at its label after the class pass, so that pass reads no target for them."""
    width = slot.shape[0]
    n_int = parent.shape[0]
    offsets = _row_offsets(width)
    mass[:] = 0.0
    total = lanes_fill(0.0)
    soft = labels[0] == NO_LABEL
    for jb in range(0, width, LANES):
        cols = lanes_columns(p, offsets, jb)
        if soft:
            q_cols = _target_columns(q_flat, q_offsets, jb, n_cls, tail)
        for c in range(LANES):
            j = jb + c
            d = cols[c] - q_cols[c] if soft else cols[c]
            s = slot[j] * LANES
            lanes_store(mass, s, lanes_load(mass, s) + d)
            total = total + cost(d, leaf_w[j], rho)
            if need_grad:
                lanes_store(h, j * LANES, dcost(d, leaf_w[j], rho))
    if not soft:  # the -1 of each row's one-hot target, at its label
        lanes_store(dots, 0, total)
        for l in range(LANES):
            y = labels[l]
            if y >= 0:
                py = float(p[l * width + y])
                mass[slot[y] * LANES + l] -= 1.0
                dots[l] += _cost(py - 1.0, leaf_w[y], rho) - _cost(py, leaf_w[y], rho)
                if need_grad:
                    h[y * LANES + l] = _dcost(py - 1.0, leaf_w[y], rho)
        total = lanes_load(dots, 0)
    for k in range(n_int - 1, 0, -1):
        s = parent[k] * LANES
        lanes_store(mass, s, lanes_load(mass, s) + lanes_load(mass, k * LANES))
    lanes_store(mass, 0, lanes_fill(0.0))  # mass becomes G: the sum of dcost over the edges up to the root
    for k in range(1, n_int):
        f = lanes_load(mass, k * LANES)
        total = total + cost(f, weight[k], rho)
        lanes_store(mass, k * LANES, lanes_load(mass, parent[k] * LANES) + dcost(f, weight[k], rho))
    if need_grad:
        for jb in range(0, width, LANES):
            lanes_store_columns(g, offsets, jb, (
                _path_gradient(h, mass, slot, jb), _path_gradient(h, mass, slot, jb + 1),
                _path_gradient(h, mass, slot, jb + 2), _path_gradient(h, mass, slot, jb + 3),
                _path_gradient(h, mass, slot, jb + 4), _path_gradient(h, mass, slot, jb + 5),
                _path_gradient(h, mass, slot, jb + 6), _path_gradient(h, mass, slot, jb + 7),
            ))  # fmt: skip
    return lanes_to_tuple(total)

# One compiled copy of each block per exponent class. Separate functions, not inlined into the kernel:
# LLVM's time grows faster than linearly with function size, and six inlined copies took minutes to compile.


@njit(fastmath=FASTMATH)
def _chain_rho1(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail):  # pragma: no cover
    return _chain_block(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail, _lanes_cost_rho1, _lanes_dcost_rho1)


@njit(fastmath=FASTMATH)
def _chain_rho2(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail):  # pragma: no cover
    return _chain_block(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail, _lanes_cost_rho2, _lanes_dcost_rho2)


@njit(fastmath=FASTMATH)
def _chain_pow(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail):  # pragma: no cover
    return _chain_block(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail, _lanes_cost_pow, _lanes_dcost_pow)


@njit(fastmath=FASTMATH)
def _tree_rho1(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots):  # pragma: no cover
    return _tree_block(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots,
                       _lanes_cost_rho1, _lanes_dcost_rho1)


@njit(fastmath=FASTMATH)
def _tree_rho2(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots):  # pragma: no cover
    return _tree_block(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots,
                       _lanes_cost_rho2, _lanes_dcost_rho2)


@njit(fastmath=FASTMATH)
def _tree_pow(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots):  # pragma: no cover
    return _tree_block(p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots,
                       _lanes_cost_pow, _lanes_dcost_pow)


@njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _lanes_kernel(x, q, y, ignore_index, from_logits, need_grad, scale, loss, grad, chain, slot, leaf_w, parent, weight, rho, threads):  # pragma: no cover
    """Blocks of LANES rows, split in one chunk of blocks per thread. For a chain ``weight`` holds the spacing.
    ``slot``, ``leaf_w`` and the spacing are padded to W, a multiple of LANES (see ``padded_width``).

    Lanes past the last row repeat it; ignored rows and bad labels are computed against no target (their
    outputs are then overwritten).
    """
    n, n_cls = x.shape
    width = weight.shape[0] if chain else slot.shape[0]
    n_blocks = (n + LANES - 1) // LANES
    chunks = min(n_blocks, threads)
    q_flat = q.ravel()
    for t in prange(chunks):
        p = np.zeros(LANES * width, dtype=x.dtype)  # the padding stays 0
        g = np.empty(LANES * width if need_grad else 0, dtype=np.float64)  # every block writes all of it
        h = np.empty(LANES * width if need_grad else 0, dtype=np.float64)
        mass = np.empty(0 if chain else LANES * parent.shape[0], dtype=np.float64)
        tail = np.empty(LANES * LANES, dtype=q.dtype)
        labels = np.empty(LANES, dtype=np.int64)
        q_rows = np.empty(LANES, dtype=np.int64)
        dots = np.empty(LANES, dtype=np.float64)
        for b in range(t * n_blocks // chunks, (t + 1) * n_blocks // chunks):
            for l in range(LANES):
                i = min(b * LANES + l, n - 1)
                labels[l] = _label(y, i, n_cls, ignore_index)
                q_rows[l] = (i if q.shape[0] > 1 else 0) * n_cls
                _probabilities(x, i, from_logits, p, l * width)
            lab = (labels[0], labels[1], labels[2], labels[3], labels[4], labels[5], labels[6], labels[7])
            q_offsets = (q_rows[0], q_rows[1], q_rows[2], q_rows[3], q_rows[4], q_rows[5], q_rows[6], q_rows[7])
            if chain:
                args = (p, q_flat, q_offsets, lab, n_cls, weight, rho, need_grad, h, g, tail)
                total = _chain_rho1(*args) if rho == 1.0 else _chain_rho2(*args) if rho == 2.0 else _chain_pow(*args)
            else:
                args = (p, q_flat, q_offsets, lab, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots)
                total = _tree_rho1(*args) if rho == 1.0 else _tree_rho2(*args) if rho == 2.0 else _tree_pow(*args)
            for l in range(min(LANES, n - b * LANES)):
                i = b * LANES + l
                if labels[l] == IGNORED or labels[l] == BAD_LABEL:
                    _skip_row(i, labels[l], need_grad, loss, grad)
                    continue
                loss[i] = total[l]
                if need_grad:
                    _finish_gradient(p, l * width, g[l * width : l * width + n_cls], from_logits, scale, grad, i)


# ---------------------------------------------------------------------- hard targets, rho = 1


@njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _distance_kernel(x, y, ignore_index, dist, depth, from_logits, need_grad, scale, loss, grad, threads):  # pragma: no cover
    """Hard targets, rho = 1: loss_i = sum_j p_ij D[y_i, j], with the softmax fused in.

    dL/dp_j = D[y, j] - depth(y): the sum of w_e sign(f_e) over the edges above j, with the signs of
    interior flows (-1 on the path to y, +1 off it), the same subgradient as the reference backend.
    Through the softmax the constant cancels: dL/dx = p (D[y] - L).
    """
    n, n_cls = x.shape
    chunks = min(n, threads)
    for t in prange(chunks):
        p = np.empty(n_cls, dtype=x.dtype)
        for i in range(t * n // chunks, (t + 1) * n // chunks):
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


@njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _row_sums_and_negatives(q, sums, negatives):  # pragma: no cover
    """Row sums of q (in q's precision, as torch.sum's) and counts of negative entries: vectorised loops
    (a running minimum would not be)."""
    for i in prange(q.shape[0]):
        s = q[i, 0] - q[i, 0]
        neg = 0.0
        for j in range(q.shape[1]):
            s += q[i, j]
            neg += 1.0 if q[i, j] < 0 else 0.0
        sums[i] = s
        negatives[i] = neg


def distribution_stats(q: np.ndarray) -> tuple[bool, float, float]:
    """(all finite, smallest entry, largest |row sum - 1|) of ``q`` (N, C), for ``_checks.check_distribution_stats``
    (the smallest entry only when negative, else 0)."""
    if q.size == 0:
        return True, 0.0, 0.0
    sums = np.empty(q.shape[0], dtype=np.float64)
    negatives = np.empty(q.shape[0], dtype=np.float64)
    _row_sums_and_negatives(q, sums, negatives)
    if not np.isfinite(sums).all():  # a NaN or inf anywhere makes its row's sum NaN or inf
        return False, 0.0, 0.0
    return True, float(q.min()) if negatives.any() else 0.0, float(np.abs(sums - 1).max())


#: Lane-kernel scratch that is always acceptable, whatever the input's size (cache-sized; see lanes_pay_off).
LANES_SCRATCH_FLOOR = 1 << 20


def lanes_pay_off(n_rows: int, n_cls: int, n_internal: int, itemsize: int) -> bool:
    """Whether the LANES-row kernel is used: for at least LANES rows, when its scratch (per thread, LANES rows
    of probabilities and of float64 gradients, and per-class and internal-node lanes) is at most the input's
    size or at most ``LANES_SCRATCH_FLOOR`` (1 MiB). Otherwise one row at a time: fewer than LANES rows (the
    lanes would repeat the last row), or small batches of huge trees (the scratch would outweigh the input).

    Measured on the ImageNet tree, rho = 2, 2 threads (``benchmarks/profile_fused.py --kernel``): the kernel
    takes 0.06 ms for a batch of 64 through the lanes and 0.26 ms one row at a time; 0.02 and 0.04 ms at 8."""
    if n_rows < LANES:
        return False
    threads = min(numba.get_num_threads(), -(-n_rows // LANES))
    scratch = threads * LANES * (padded_width(n_cls) * (itemsize + 16) + n_internal * 8)
    return scratch <= max(n_rows * n_cls * itemsize, LANES_SCRATCH_FLOOR)


def tree_rows(
    x: np.ndarray,
    labels: np.ndarray | None,
    soft: np.ndarray | None,
    tree: Tree,
    rho: float,
    from_logits: bool,
    need_grad: bool,
    ignore_index: int = -100,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row loss (N,) float64 and, if ``need_grad``, ``scale`` * d loss_i / d x_i (N, C) in x's dtype.

    Args:
        x: (N, C) float32/float64 C-contiguous logits (probabilities when not ``from_logits``).
        labels: (N,) int64 class indices, or None when ``soft`` (N, C) (x's dtype) is given.
        ignore_index: label whose rows get loss 0 and gradient 0.
    A label outside [0, C) (and not ``ignore_index``) gets a NaN loss, as do rows with NaN or +inf logits;
    the caller turns those into errors.
    """
    n, c = x.shape
    loss = np.empty(n, dtype=np.float64)
    grad = np.empty((n, c) if need_grad else (0, c), dtype=x.dtype)
    if n == 0:
        return loss, grad if need_grad else None
    y = labels if labels is not None else np.empty(0, dtype=np.int64)
    if soft is None and rho == 1.0 and c <= DISTANCE_MATRIX_MAX_CLASSES:
        dist, depth = cached_distance_rows(tree, x.dtype)
        _distance_kernel(x, y, ignore_index, dist, depth, from_logits, need_grad, scale, loss, grad, numba.get_num_threads())
        return loss, grad if need_grad else None
    q = soft if soft is not None else zero_row(c, x.dtype)
    if tree.is_chain:
        arrays = (_EMPTY_INT, _EMPTY_FLOAT, _EMPTY_INT, cached_chain_spacing(tree))  # no leaf edges, no internal nodes
    else:
        it = InternalTree.cached(tree)
        arrays = (it.slot, it.leaf_w, it.parent, it.weight)
    kernel = _lanes_kernel if lanes_pay_off(n, c, arrays[2].shape[0], x.itemsize) else _rows_kernel
    kernel(x, q, y, ignore_index, from_logits, need_grad, scale, loss, grad, tree.is_chain, *arrays, float(rho), numba.get_num_threads())
    return loss, grad if need_grad else None


_EMPTY_INT = np.empty(0, dtype=np.int64)
_EMPTY_FLOAT = np.empty(0, dtype=np.float64)


@functools.lru_cache(maxsize=32)
def zero_row(n_cls: int, dtype: np.dtype) -> np.ndarray:
    """A (1, C) row of zeros: the "distribution" part of class-index targets (see the labels section)."""
    return np.zeros((1, n_cls), dtype=dtype)


def follow_torch_threads() -> None:
    """Run the kernels on as many threads as torch uses (``torch.set_num_threads`` governs both)."""
    import torch

    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
