"""Random trees for tests, benchmarks and experiments: one generator, its shapes chosen by arguments."""

from __future__ import annotations

import numpy as np

from emdloss import Tree

SHAPES = ("recursive", "deep", "bushy")


def random_tree(
    rng: np.random.Generator,
    num_nodes: int,
    *,
    shape: str = "recursive",
    num_internal: int | None = None,
    weight_range: tuple[float, float] = (0.5, 1.5),
    zero_edge: bool = False,
    shuffle_ids: bool = False,
    internal_classes: bool = False,
    permute_classes: bool = True,
) -> Tree:
    """A random rooted tree on ``num_nodes`` nodes whose classes are its leaves (and some internal nodes).

    Node ``i > 0`` takes a parent drawn uniformly among earlier nodes: any of them (``shape="recursive"``, the
    uniform random recursive tree, expected depth ~ ln n), one of the three before it (``"deep"``) or one of
    the first three (``"bushy"``). With ``num_internal = k``, only the first ``k`` nodes can be parents: they
    form such a tree and every later node is a leaf under one of them (``k = C // 4`` with ``C`` leaves gives
    the benchmark's wide trees).

    Args:
        rng: the random source; the tree is a function of its state.
        weight_range: edge lengths are uniform in it.
        zero_edge: set one random edge length to 0 (legal, and a corner case for kernels).
        shuffle_ids: permute node ids so that they follow no order (DFS order must then be computed).
        internal_classes: add about half of the internal nodes as classes.
        permute_classes: list the classes in random output order (else in increasing node id).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    n = int(num_nodes)
    node = np.arange(n)
    if num_internal is None:
        low = np.maximum(0, node - 3) if shape == "deep" else np.zeros(n, dtype=np.int64)
        high = np.minimum(node, 3) if shape == "bushy" else node
        parents = np.full(n, -1, dtype=np.int64)
        parents[1:] = rng.integers(low[1:], high[1:])
    else:  # vectorised for the benchmark's 10^6-class trees; the internal part is a recursive tree
        k = max(1, min(int(num_internal), n))
        parents = np.floor(rng.random(k) * np.arange(k)).astype(np.int64)
        parents[0] = -1
        parents = np.concatenate([parents, rng.integers(0, k, n - k)])
    weights = rng.uniform(*weight_range, n)
    if zero_edge and n > 3:
        weights[rng.integers(1, n)] = 0.0
    if shuffle_ids:
        perm = rng.permutation(n)
        inverse = np.empty(n, dtype=np.int64)
        inverse[perm] = node
        parents = np.where(parents[perm] >= 0, inverse[np.maximum(parents[perm], 0)], -1)
        weights = weights[perm]
    is_leaf = np.ones(n, dtype=bool)
    is_leaf[parents[parents >= 0]] = False
    if num_internal is not None and not shuffle_ids:  # the first k nodes are internal, childless or not
        is_leaf[: max(1, min(int(num_internal), n))] = False
    classes = np.flatnonzero(is_leaf)
    if internal_classes:
        internal = np.flatnonzero(~is_leaf)
        classes = np.concatenate([classes, rng.choice(internal, size=max(1, internal.size // 2), replace=False)])
    if permute_classes:
        classes = rng.permutation(classes)
    return Tree.from_parents(parents, weights=weights, classes=classes)
