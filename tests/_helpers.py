"""Shared test helpers (import as `from _helpers import ...`): random trees and distributions, data skip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emdloss import Tree
from emdloss_lab import synthetic
from emdloss_lab.data import DataUnavailable, shared_data_dir


def random_tree(
    rng: np.random.Generator, num_nodes: int, *, shape: str = "recursive", internal_classes: bool = False
) -> Tree:
    """The lab's random tree with the tests' choices: edge lengths in [0.1, 3] with one of length 0, node ids
    in no order, classes in random output order (leaves, plus half the internal nodes if asked)."""
    return synthetic.random_tree(
        rng,
        num_nodes,
        shape=shape,
        weight_range=(0.1, 3.0),
        zero_edge=True,
        shuffle_ids=True,
        internal_classes=internal_classes,
    )


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
