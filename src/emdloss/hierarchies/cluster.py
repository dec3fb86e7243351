"""A tree surrogate of any class metric, by hierarchical clustering (needs scipy: ``emdloss[hierarchies]``).

Given a (C, C) distance matrix ``D`` between classes (or class embeddings), agglomerative clustering gives
a binary tree whose internal node ``v`` has merge height ``h_v``. With edge lengths
``w(child -> v) = (h_v - h_child) / 2`` (leaves at height 0) the tree distance between classes ``i`` and
``j`` is ``h_{lca(i, j)}``, the cophenetic distance of the clustering. EMD on that tree costs O(C) per
sample instead of the O(C^2)-O(C^3) of an exact EMD under ``D``; how good the surrogate is shows in the
:class:`DistortionReport` (mean relative distortion and correlation of the two metrics over class pairs).

"average" linkage (UPGMA) is the default; it usually gives the highest cophenetic correlation with ``D``.
Only monotone linkages are accepted (no "centroid"/"median", whose merge heights can decrease).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np

from .._optional import require
from ..tree import Tree

__all__ = ["DistortionReport", "from_distance_matrix", "from_embeddings", "tree_distortion"]

_METHODS = ("average", "complete", "single", "weighted", "ward")


@dataclass
class DistortionReport:
    """How far the tree metric ``T`` is from the original metric ``D`` over the pairs ``i < j``.

    Attributes:
        mean_relative_distortion: mean of ``|T_ij - D_ij| / D_ij`` over pairs with ``D_ij > 0``.
        max_relative_distortion: the largest such ratio.
        pearson: Pearson correlation of ``T`` and ``D`` over the pairs (the cophenetic correlation).
        spearman: Spearman rank correlation over the pairs.
        num_pairs: number of pairs compared.
    """

    mean_relative_distortion: float
    max_relative_distortion: float
    pearson: float
    spearman: float
    num_pairs: int

    def summary(self) -> str:
        return (
            f"tree vs original metric over {self.num_pairs} class pairs: mean relative distortion "
            f"{self.mean_relative_distortion:.3f} (max {self.max_relative_distortion:.3f}), "
            f"Pearson {self.pearson:.3f}, Spearman {self.spearman:.3f}"
        )


def _check_matrix(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(f"distance must be a square (C, C) matrix with C >= 2, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("distance contains NaN or infinite entries")
    if np.any(d < 0):
        raise ValueError(f"distance must be >= 0, found {d.min():.3g}")
    if not np.allclose(d, d.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(d).max()))):
        raise ValueError("distance must be symmetric (D[i, j] == D[j, i])")
    if np.any(np.diag(d) != 0):
        raise ValueError("distance must have a zero diagonal")
    return d


def tree_distortion(tree: Tree, distance: np.ndarray) -> DistortionReport:
    """Compare ``tree.distance_matrix()`` with ``distance`` (C, C) over all class pairs ``i < j``."""
    stats = require("scipy.stats", "hierarchies", "emdloss.hierarchies.tree_distortion")
    pearsonr, spearmanr = stats.pearsonr, stats.spearmanr

    d = _check_matrix(distance)
    t = tree.distance_matrix()
    if t.shape != d.shape:
        raise ValueError(f"distance has shape {d.shape} but the tree has {tree.num_classes} classes")
    iu = np.triu_indices(d.shape[0], 1)
    dv, tv = d[iu], t[iu]
    pos = dv > 0
    rel = np.abs(tv[pos] - dv[pos]) / dv[pos]
    const = np.ptp(dv) == 0 or np.ptp(tv) == 0
    return DistortionReport(
        mean_relative_distortion=float(rel.mean()) if rel.size else 0.0,
        max_relative_distortion=float(rel.max()) if rel.size else 0.0,
        pearson=float("nan") if const else float(pearsonr(tv, dv)[0]),
        spearman=float("nan") if const else float(spearmanr(tv, dv)[0]),
        num_pairs=int(dv.size),
    )


def _tree_from_linkage(z: np.ndarray, names: Sequence[str] | None, collapse_ties: bool) -> Tree:
    """Binary tree of a scipy linkage ``z`` ((C-1, 4)); leaves 0..C-1 are the classes in order."""
    c = z.shape[0] + 1
    n = 2 * c - 1
    height = np.zeros(n)
    height[c:] = z[:, 2]
    parents = np.full(n, -1, dtype=np.int64)
    for k, (a, b) in enumerate(z[:, :2].astype(np.int64)):
        parents[a] = parents[b] = c + k
    w = np.zeros(n)
    w[:-1] = (height[parents[:-1]] - height[:-1]) / 2.0
    w = np.maximum(w, 0.0)  # ward/complete are monotone; clip rounding
    node_names = [*(names if names is not None else [f"class {i}" for i in range(c)])]
    node_names += [f"<cluster {k}>" for k in range(c - 1)]
    if collapse_ties:
        # contract internal nodes at the height of their parent (zero-length internal edges): n-ary merges
        remove = np.zeros(n, dtype=bool)
        remove[c:-1] = w[c:-1] == 0.0
        for v in range(n - 2, -1, -1):  # parents have larger ids, so walk down: resolve to kept ancestors
            p = parents[v]
            if p >= 0 and remove[p]:
                parents[v] = parents[p]  # parents[p] already points to a kept node
        keep = ~remove
        new_id = np.cumsum(keep) - 1
        parents = np.where(parents[keep] >= 0, new_id[np.maximum(parents[keep], 0)], -1)
        w = w[keep]
        node_names = [nm for nm, k in zip(node_names, keep.tolist()) if k]
    return Tree.from_parents(parents, weights=w, names=node_names, classes=np.arange(c))


# The overloads tell a type checker that the result is a (tree, report) pair exactly when return_report=True.
@overload
def from_distance_matrix(
    distance: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    method: str = "average",
    collapse_ties: bool = True,
    return_report: Literal[False] = False,
) -> Tree: ...


@overload
def from_distance_matrix(
    distance: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    method: str = "average",
    collapse_ties: bool = True,
    return_report: Literal[True],
) -> tuple[Tree, DistortionReport]: ...


@overload
def from_distance_matrix(
    distance: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    method: str = "average",
    collapse_ties: bool = True,
    return_report: bool = False,
) -> Tree | tuple[Tree, DistortionReport]: ...


def from_distance_matrix(
    distance: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    method: str = "average",
    collapse_ties: bool = True,
    return_report: bool = False,
) -> Tree | tuple[Tree, DistortionReport]:
    """Tree surrogate of a class metric ``distance`` (C, C) by agglomerative clustering.

    Args:
        distance: symmetric, non-negative, zero diagonal.
        names: class names (default ``"class i"``); class ``i`` of the tree is row ``i``.
        method: scipy linkage, "average" (UPGMA, default), "complete", "single" or "weighted".
        collapse_ties: merge clusters formed at the same height into one n-ary node.
        return_report: also return the :class:`DistortionReport` against ``distance``.
    """
    linkage = require("scipy.cluster.hierarchy", "hierarchies", "emdloss.hierarchies.from_distance_matrix").linkage
    squareform = require("scipy.spatial.distance", "hierarchies").squareform

    if method not in _METHODS or method == "ward":
        raise ValueError(f"method must be one of {_METHODS[:-1]} for a distance matrix, got {method!r}")
    d = _check_matrix(distance)
    _check_names(names, d.shape[0])
    z = linkage(squareform(d, checks=False), method=method)
    tree = _tree_from_linkage(z, names, collapse_ties)
    return (tree, tree_distortion(tree, d)) if return_report else tree


@overload
def from_embeddings(
    embeddings: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    metric: str = "euclidean",
    method: str = "average",
    collapse_ties: bool = True,
    return_report: Literal[False] = False,
) -> Tree: ...


@overload
def from_embeddings(
    embeddings: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    metric: str = "euclidean",
    method: str = "average",
    collapse_ties: bool = True,
    return_report: Literal[True],
) -> tuple[Tree, DistortionReport]: ...


@overload
def from_embeddings(
    embeddings: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    metric: str = "euclidean",
    method: str = "average",
    collapse_ties: bool = True,
    return_report: bool = False,
) -> Tree | tuple[Tree, DistortionReport]: ...


def from_embeddings(
    embeddings: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    metric: str = "euclidean",
    method: str = "average",
    collapse_ties: bool = True,
    return_report: bool = False,
) -> Tree | tuple[Tree, DistortionReport]:
    """Tree surrogate of the ``metric`` distances between class embeddings (C, dim) (e.g. word vectors).

    ``method`` may also be "ward" here (euclidean only); the report compares the tree with the pairwise
    ``metric`` distances. See :func:`from_distance_matrix`.
    """
    linkage = require("scipy.cluster.hierarchy", "hierarchies", "emdloss.hierarchies.from_embeddings").linkage
    distance = require("scipy.spatial.distance", "hierarchies")
    pdist, squareform = distance.pdist, distance.squareform

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embeddings must have shape (C, dim) with C >= 2, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinite entries")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "ward" and metric != "euclidean":
        raise ValueError("method='ward' needs metric='euclidean'")
    _check_names(names, x.shape[0])
    cond = pdist(x, metric=metric)
    z = linkage(x, method="ward") if method == "ward" else linkage(cond, method=method)
    tree = _tree_from_linkage(z, names, collapse_ties)
    return (tree, tree_distortion(tree, squareform(cond))) if return_report else tree


def _check_names(names: Sequence[str] | None, c: int) -> None:
    if names is not None and (isinstance(names, str) or len(names) != c):
        raise ValueError(f"names must be a sequence of {c} class names")
