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


def cached_distance_rows(tree: Tree, dtype: np.dtype) -> np.ndarray:
    """The tree's C x C distance matrix in ``dtype``, cached on the tree."""
    key = ("numba_distance", np.dtype(dtype).str)
    found = tree._derived.get(key)
    if found is None:
        found = np.ascontiguousarray(tree.distance_matrix(), dtype=dtype)
        tree._derived[key] = found
    return found


@njit(inline="always")
def _cost(f, w, rho):
    """w |f|^rho."""
    a = abs(f)
    if rho == 1.0:
        return w * a
    if rho == 2.0:
        return w * a * a
    return w * a**rho


@njit(inline="always")
def _dcost(f, w, rho):
    """d/df of w |f|^rho, branch-free in the sign (flows of both signs are common: no mispredictions)."""
    sign = (1.0 if f > 0.0 else 0.0) - (1.0 if f < 0.0 else 0.0)  # compiles to selects
    if rho == 1.0:
        return w * sign
    if rho == 2.0:
        return 2.0 * w * f
    return rho * w * sign * abs(f) ** (rho - 1.0)


@njit(parallel=True, cache=True, nogil=True)
def _chain_rows(p, q, y, spacing, rho, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Chains: flows are suffix sums S_k = sum_{j >= k} d_j, k = 1..C-1, and g_j = sum_{k <= j} h_k.

    Three sweeps per row with the running sums in registers (no parent-pointer memory round trips).
    ``spacing[k]`` is the length of the edge between classes k-1 and k (spacing[0] unused).
    """
    n_rows, n_cls = p.shape
    soft = q.shape[0] > 0
    for i in prange(n_rows):
        yi = -1 if soft else y[i]
        suffix = 0.0
        total = 0.0
        for k in range(n_cls - 1, 0, -1):
            d = float(p[i, k])
            if soft:
                d -= float(q[i, k])
            elif k == yi:
                d -= 1.0
            suffix += d
            total += _cost(suffix, spacing[k], rho)
            if need_grad:
                grad[i, k] = _dcost(suffix, spacing[k], rho)
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
def _tree_rows(p, q, y, slot, leaf_w, parent, weight, rho, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Rows of p (N, C) against soft q (N, C) (when y[0] < 0 is not used) or hard labels y (N,).

    ``q`` has shape (N, C) for soft targets and (0, C) for hard ones.
    """
    n_rows, n_cls = p.shape
    n_int = parent.shape[0]
    soft = q.shape[0] > 0
    for i in prange(n_rows):
        mass = np.zeros(n_int, dtype=np.float64)
        yi = -1 if soft else y[i]
        total = 0.0
        for j in range(n_cls):
            d = float(p[i, j])
            if soft:
                d -= float(q[i, j])
            elif j == yi:
                d -= 1.0
            mass[slot[j]] += d
            total += _cost(d, leaf_w[j], rho)
        for k in range(n_int - 1, 0, -1):
            mass[parent[k]] += mass[k]
        # mass[k] becomes G[k], the sum of dcost over the edges from node k up to the root.
        mass[0] = 0.0
        for k in range(1, n_int):
            f = mass[k]
            total += _cost(f, weight[k], rho)
            mass[k] = mass[parent[k]] + _dcost(f, weight[k], rho)
        loss[i] = total
        if need_grad:
            dot = 0.0
            for j in range(n_cls):
                d = float(p[i, j])
                if soft:
                    d -= float(q[i, j])
                elif j == yi:
                    d -= 1.0
                g = mass[slot[j]] + _dcost(d, leaf_w[j], rho)
                grad[i, j] = g
                dot += float(p[i, j]) * g
            if from_logits:
                for j in range(n_cls):
                    grad[i, j] = p[i, j] * (grad[i, j] - dot)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _distance_rows(p, y, dist, from_logits, need_grad, loss, grad):  # pragma: no cover
    """Hard targets, rho = 1: loss_i = sum_j p_ij D[y_i, j]; dL/dp = D[y_i]; through softmax p (D[y] - L)."""
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
                for j in range(n_cls):
                    grad[i, j] = row[j]


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
        dist = cached_distance_rows(tree, p.dtype)
        _distance_rows(p, hard, dist, from_logits, need_grad, loss, grad)
    else:
        q = soft if soft is not None else np.empty((0, c), dtype=p.dtype)
        y = hard if hard is not None else np.empty(0, dtype=np.int64)
        if tree.is_chain:
            _chain_rows(p, q, y, cached_chain_spacing(tree), float(rho), from_logits, need_grad, loss, grad)
            return loss, grad if need_grad else None
        it = InternalTree.cached(tree)
        _tree_rows(p, q, y, it.slot, it.leaf_w, it.parent, it.weight, float(rho), from_logits, need_grad, loss, grad)
    return loss, grad if need_grad else None


def num_threads() -> int:
    return int(numba.get_num_threads())

