"""The tree as the fused kernels read it: flat, contiguous, padded arrays, built once per tree and cached on it.

A tree kernel only needs a buffer for the tree's *internal* nodes: a leaf class's edge carries exactly its own
mass difference ``d_j = p_j - q_j``. So the tree is compressed to its internal nodes in DFS pre-order
(:class:`InternalTree`); a chain needs only its spacings (:func:`chain_spacing`); hard targets with rho = 1 use
the class distance matrix (:func:`distance_rows`).

The class arrays are padded to a multiple of :data:`LANES` classes for the lane kernels: a padding class has
probability 0 and sits at the root on an edge of length 0, so it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._class_pairs import class_pairs
from ...tree import Tree, _fill_depth
from ..base import loss_weights

#: Rows the lane kernels sweep together, and the multiple the class arrays are padded to.
LANES = 8


def padded_width(n_cls: int) -> int:
    """C rounded up to a multiple of LANES: the length of the class arrays below (see the lanes section)."""
    return -(-n_cls // LANES) * LANES


def _pad(values: np.ndarray, dtype: type) -> np.ndarray:
    out: np.ndarray = np.zeros(padded_width(values.shape[0]), dtype=dtype)
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
        weight = loss_weights(tree)[internal]  # 0 at the root
        cls = tree.classes
        cls_internal = is_internal[cls]
        slot = np.where(cls_internal, index[cls], index[np.maximum(tree.parents[cls], 0)])
        slot = np.where(cls == tree.root, 0, slot)
        leaf_w = np.where(cls_internal, 0.0, loss_weights(tree)[cls])
        return InternalTree(
            slot=_pad(slot, np.int64),
            leaf_w=_pad(leaf_w, np.float64),
            parent=np.ascontiguousarray(parent, dtype=np.int64),
            weight=np.ascontiguousarray(weight, dtype=np.float64),
        )

    @staticmethod
    def cached(tree: Tree) -> InternalTree:
        return tree.cached("numba_internal", lambda: InternalTree.from_tree(tree))


def chain_spacing(tree: Tree) -> np.ndarray:
    """(W,) float64, W = ``padded_width(C)``: entry k is the length of the edge between chain classes k-1 and
    k; 0 at k = 0 and in the padding. Cached on the tree."""

    def build() -> np.ndarray:
        spacing = _pad(loss_weights(tree)[tree.classes], np.float64)
        spacing[0] = 0.0
        return spacing

    return tree.cached("numba_chain_spacing", build)


def distance_rows(tree: Tree, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The tree's C x C distance matrix and the (C,) depth of each class under the loss's edge lengths
    (:func:`~emdloss.backends.base.loss_weights`: the edges above every class weigh 0), in ``dtype``, cached."""

    def build() -> tuple[np.ndarray, np.ndarray]:
        below = tree.preorder[1:]
        depth = np.zeros(tree.num_nodes)
        _fill_depth(depth, tree.preorder, tree.parents[below], loss_weights(tree)[below])  # sums along paths
        # built in dtype directly, not cast from tree.distance_matrix(): that float64 table would stay cached
        # on the tree too (3x the memory)
        return class_pairs(tree, dtype=dtype), np.ascontiguousarray(depth[tree.classes], dtype=dtype)

    return tree.cached(("numba_distance", np.dtype(dtype).str), build)
