"""Shared test helpers (import as `from _helpers import ...`): random trees and distributions, data skip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emdloss import Tree
from emdloss.data import DataUnavailable, shared_data_dir


def random_tree(
    rng: np.random.Generator,
    num_nodes: int,
    *,
    shape: str = "random",
    internal_classes: bool = False,
    weighted: bool = True,
    shuffle_ids: bool = True,
) -> Tree:
    """A random rooted tree. ``shape``: "random" (uniform recursive), "deep" (parents near the node),
    "bushy" (parents among the first few nodes). Classes: all leaves, plus some internal nodes if asked,
    in random output order."""
    n = num_nodes
    parents = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        if shape == "deep":
            parents[i] = rng.integers(max(0, i - 3), i)
        elif shape == "bushy":
            parents[i] = rng.integers(0, min(i, 3))
        else:
            parents[i] = rng.integers(0, i)
    weights = rng.uniform(0.1, 3.0, n) if weighted else np.ones(n)
    if weighted and n > 3:
        weights[rng.integers(1, n)] = 0.0  # zero-length edges are legal
    if shuffle_ids:  # node ids need not follow any order
        perm = rng.permutation(n)
        inv = np.empty(n, dtype=np.int64)
        inv[perm] = np.arange(n)
        parents = np.where(parents[perm] >= 0, inv[np.maximum(parents[perm], 0)], -1)
        weights = weights[perm]
    is_leaf = np.ones(n, dtype=bool)
    is_leaf[parents[parents >= 0]] = False
    classes = np.flatnonzero(is_leaf)
    if internal_classes:
        internal = np.flatnonzero(~is_leaf)
        extra = rng.choice(internal, size=max(1, internal.size // 2), replace=False)
        classes = np.concatenate([classes, extra])
    classes = rng.permutation(classes)
    return Tree.from_parents(parents, weights=weights, classes=classes)


def random_simplex(rng: np.random.Generator, n: int, c: int, sparsity: float = 0.0) -> np.ndarray:
    """(n, c) rows on the probability simplex; with ``sparsity`` > 0 some entries are exactly zero."""
    x = rng.exponential(size=(n, c))
    if sparsity:
        x[rng.random((n, c)) < sparsity] = 0.0
        x[np.arange(n), rng.integers(0, c, n)] += 1.0
    return x / x.sum(1, keepdims=True)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def shared_data_or_skip():
    try:
        return shared_data_dir()
    except DataUnavailable as exc:
        pytest.skip(f"shared data not available: {exc}")


def is_ancestor(tree: Tree, ancestor: int, node: int) -> bool:
    """True if ``ancestor`` lies on the path from ``node`` to the root (a node is its own ancestor)."""
    while node != -1:
        if node == ancestor:
            return True
        node = int(tree.parents[node])
    return False
