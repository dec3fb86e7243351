"""Fused CPU backend: one pass per row (flows, loss and gradient), parallel over rows with numba.

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

Sums run in float64 scalars. For hard targets with rho = 1 and a moderate number of classes the loss is
``sum_j p_j D[j, y]`` (the expected tree distance to the true class), one dot product per row with a
cached float32 distance matrix. The softmax itself is torch's (vectorised exp), done before the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ..tree import Tree

#: Largest class count for which hard rho=1 targets use the cached C x C distance matrix (64 MiB float32).
DISTANCE_MATRIX_MAX_CLASSES = 4096


@dataclass(frozen=True)
class InternalTree:
    """The tree compressed to its internal nodes (see the module docstring). All arrays contiguous."""

    slot: np.ndarray  # (C,) int64
    leaf_w: np.ndarray  # (C,) float64, 0 for internal classes
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
            slot=np.ascontiguousarray(slot, dtype=np.int64),
            leaf_w=np.ascontiguousarray(leaf_w, dtype=np.float64),
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
    """(C,) float64: entry k is the length of the edge between chain classes k-1 and k (entry 0 unused)."""
    found = tree._derived.get("numba_chain_spacing")
    if found is None:
        found = np.ascontiguousarray(tree.weights[tree.classes], dtype=np.float64)
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
# One pair per exponent class. The kernels receive the pair as arguments, so numba compiles a specialised
# copy of the row loops for each (no test of rho inside the loops; rho = 1 and 2 avoid pow entirely).


@njit(inline="always")
def _cost_rho1(f, w, rho):
    return w * abs(f)


@njit(inline="always")
def _dcost_rho1(f, w, rho):
    return w * ((1.0 if f > 0.0 else 0.0) - (1.0 if f < 0.0 else 0.0))  # branch-free sign: selects


@njit(inline="always")
def _cost_rho2(f, w, rho):
    return w * f * f


@njit(inline="always")
def _dcost_rho2(f, w, rho):
    return 2.0 * w * f


@njit(inline="always")
def _cost_pow(f, w, rho):
    return w * abs(f) ** rho


@njit(inline="always")
def _dcost_pow(f, w, rho):
    if f == 0.0:
        return 0.0
    return rho * w * ((1.0 if f > 0.0 else 0.0) - (1.0 if f < 0.0 else 0.0)) * abs(f) ** (rho - 1.0)


@njit(inline="always")
def _diff_soft(p, q, i, j):
    return float(p[i, j]) - float(q[i, j])


@njit(inline="always")
def _diff_hard(p, q, i, j):
    return float(p[i, j])  # the -1 at the target class is applied once per row afterwards


# ---------------------------------------------------------------------- chains


@njit(inline="always")
def _chain_row(p, q, i, yi, spacing, rho, from_logits, need_grad, loss, grad, cost, dcost):  # pragma: no cover
    n_cls = p.shape[1]
    suffix = 0.0
    total = 0.0
    for k in range(n_cls - 1, 0, -1):
        d = float(p[i, k]) - (1.0 if k == yi else 0.0)
        if yi < 0:
            d -= float(q[i, k])
        suffix += d
        total += cost(suffix, spacing[k], rho)
        if need_grad:
            grad[i, k] = dcost(suffix, spacing[k], rho)
    loss[i] = total
    if need_grad:
        prefix = 0.0
        dot = 0.0
        grad[i, 0] = 0.0
        for k in range(1, n_cls):
            prefix += grad[i, k]
            grad[i, k] = prefix
            dot += float(p[i, k]) * prefix
        if from_logits:
            for k in range(n_cls):
                grad[i, k] = p[i, k] * (grad[i, k] - dot)


@njit(parallel=True, cache=True, nogil=True)
def _chain_rows(p, q, y, spacing, rho, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Chains: flows are suffix sums S_k = sum_{j >= k} d_j, k = 1..C-1, and g_j = sum_{k <= j} h_k.

    Three sweeps per row with the running sums in registers (no parent-pointer memory round trips).
    ``spacing[k]`` is the length of the edge between classes k-1 and k (spacing[0] unused). Soft targets
    ``q`` (N, C), or hard ones ``y`` (N,) with ``q`` of shape (0, C).
    """
    soft = q.shape[0] > 0
    for i in prange(p.shape[0]):
        yi = -1 if soft else y[i]
        if rho == 1.0:
            _chain_row(p, q, i, yi, spacing, rho, from_logits, need_grad, loss, grad, _cost_rho1, _dcost_rho1)
        elif rho == 2.0:
            _chain_row(p, q, i, yi, spacing, rho, from_logits, need_grad, loss, grad, _cost_rho2, _dcost_rho2)
        else:
            _chain_row(p, q, i, yi, spacing, rho, from_logits, need_grad, loss, grad, _cost_pow, _dcost_pow)


# ---------------------------------------------------------------------- general trees


@njit(inline="always")
def _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad, cost, dcost, diff):  # pragma: no cover
    n_cls = p.shape[1]
    n_int = parent.shape[0]
    mass = np.zeros(n_int, dtype=np.float64)
    total = 0.0
    for j in range(n_cls):
        d = diff(p, q, i, j)
        mass[slot[j]] += d
        total += cost(d, leaf_w[j], rho)
    if yi >= 0:  # hard target: d_y = p_y - 1
        py = float(p[i, yi])
        total += cost(py - 1.0, leaf_w[yi], rho) - cost(py, leaf_w[yi], rho)
        mass[slot[yi]] -= 1.0
    for k in range(n_int - 1, 0, -1):
        mass[parent[k]] += mass[k]
    # mass[k] becomes G[k], the sum of dcost over the edges from node k up to the root.
    mass[0] = 0.0
    for k in range(1, n_int):
        f = mass[k]
        total += cost(f, weight[k], rho)
        mass[k] = mass[parent[k]] + dcost(f, weight[k], rho)
    loss[i] = total
    if need_grad:
        dot = 0.0
        for j in range(n_cls):
            g = mass[slot[j]] + dcost(diff(p, q, i, j), leaf_w[j], rho)
            grad[i, j] = g
            dot += float(p[i, j]) * g
        if yi >= 0:
            py = float(p[i, yi])
            g = mass[slot[yi]] + dcost(py - 1.0, leaf_w[yi], rho)
            dot += py * (g - grad[i, yi])
            grad[i, yi] = g
        if from_logits:
            for j in range(n_cls):
                grad[i, j] = p[i, j] * (grad[i, j] - dot)


@njit(parallel=True, cache=True, nogil=True)
def _tree_rows(p, q, y, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Rows of p (N, C) against soft targets q (N, C), or hard labels y (N,) with q of shape (0, C).

    Dispatches once per row to a copy of the row loops specialised for the exponent and target kind.
    """
    soft = q.shape[0] > 0
    for i in prange(p.shape[0]):
        yi = -1 if soft else y[i]
        if soft:
            if rho == 1.0:
                _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                          _cost_rho1, _dcost_rho1, _diff_soft)
            elif rho == 2.0:
                _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                          _cost_rho2, _dcost_rho2, _diff_soft)
            else:
                _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                          _cost_pow, _dcost_pow, _diff_soft)
        elif rho == 1.0:
            _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                      _cost_rho1, _dcost_rho1, _diff_hard)
        elif rho == 2.0:
            _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                      _cost_rho2, _dcost_rho2, _diff_hard)
        else:
            _tree_row(p, q, i, yi, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad,
                      _cost_pow, _dcost_pow, _diff_hard)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _distance_rows(p, y, dist, depth, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Hard targets, rho = 1: loss_i = sum_j p_ij D[y_i, j].

    dL/dp_j = D[y, j] - depth(y): the sum of w_e sign(f_e) over the edges above j, with the signs of
    interior flows (-1 on the path to y, +1 off it), the same subgradient as the reference backend.
    Through the softmax the constant cancels: dL/dx = p (D[y] - L).
    """
    n_rows, n_cls = p.shape
    for i in prange(n_rows):
        row = dist[y[i]]
        total = 0.0
        for j in range(n_cls):
            total += float(p[i, j]) * float(row[j])
        loss[i] = total
        if need_grad:
            if from_logits:
                for j in range(n_cls):
                    grad[i, j] = p[i, j] * (row[j] - total)
            else:
                shift = depth[y[i]]
                for j in range(n_cls):
                    grad[i, j] = row[j] - shift


def tree_rows(
    p: np.ndarray,
    hard: np.ndarray | None,
    soft: np.ndarray | None,
    tree: Tree,
    rho: float,
    from_logits: bool,
    need_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row loss (N,) float64 and, if ``need_grad``, d loss / d (logits or probabilities) (N, C).

    ``p`` (N, C) float32/float64 C-contiguous probabilities (the softmax of the logits when
    ``from_logits``); exactly one of ``hard`` (N,) int64 and ``soft`` (N, C) of p's dtype is given.
    """
    n, c = p.shape
    loss = np.empty(n, dtype=np.float64)
    grad = np.empty((n, c) if need_grad else (0, c), dtype=p.dtype)
    if n == 0:
        return loss, grad if need_grad else None
    if soft is None and rho == 1.0 and c <= DISTANCE_MATRIX_MAX_CLASSES:
        dist, depth = cached_distance_rows(tree, p.dtype)
        _distance_rows(p, hard, dist, depth, from_logits, need_grad, loss, grad)
    else:
        q = soft if soft is not None else np.empty((0, c), dtype=p.dtype)
        y = hard if hard is not None else np.empty(0, dtype=np.int64)
        if tree.is_chain:
            _chain_rows(p, q, y, cached_chain_spacing(tree), float(rho), from_logits, need_grad, loss, grad)
            return loss, grad if need_grad else None
        it = InternalTree.cached(tree)
        _tree_rows(p, q, y, it.slot, it.leaf_w, it.parent, it.weight, float(rho), from_logits, need_grad, loss, grad)
    return loss, grad if need_grad else None


def follow_torch_threads() -> None:
    """Run the kernels on as many threads as torch uses (``torch.set_num_threads`` governs both)."""
    import torch

    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)

