"""EMD on trees and chains equals the optimum of the transport LP (POT's exact solver), for both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ot = pytest.importorskip("ot", reason="POT (the LP reference) is a test dependency: pip install pot")
scipy_stats = pytest.importorskip("scipy.stats")

from _helpers import is_ancestor, random_simplex, random_tree, t64  # noqa: E402

from emdloss import Tree  # noqa: E402
from emdloss.functional import emd, flows  # noqa: E402

BACKENDS = ["torch", "numba"]


def lp_emd(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Exact LP optimum per row (network simplex), an independent reference."""
    return np.array([ot.emd2(p[i], q[i], cost, numItermax=10**7) for i in range(p.shape[0])])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(10))
def test_soft_targets_match_lp_on_random_trees(backend: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = ["recursive", "deep", "bushy"][seed % 3]
    tree = random_tree(rng, int(rng.integers(3, 60)), shape=shape, internal_classes=seed % 2 == 1)
    c = tree.num_classes
    p = random_simplex(rng, 6, c, sparsity=0.3 * (seed % 2))
    q = random_simplex(rng, 6, c)
    ours = emd(t64(p), t64(q), tree, from_logits=False, reduction="none", backend=backend).numpy()
    np.testing.assert_allclose(ours, lp_emd(p, q, tree.distance_matrix()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_hard_targets_match_lp_on_random_trees(backend: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    tree = random_tree(rng, int(rng.integers(3, 60)), internal_classes=seed % 2 == 0)
    c = tree.num_classes
    logits = rng.normal(size=(8, c)) * 3
    y = rng.integers(0, c, 8)
    p = torch.softmax(t64(logits), 1).numpy()
    q = np.eye(c)[y]
    ours = emd(t64(logits), torch.as_tensor(y), tree, reduction="none", backend=backend).numpy()
    np.testing.assert_allclose(ours, lp_emd(p, q, tree.distance_matrix()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 7, 50])
def test_chains_match_lp_and_scipy(backend: str, n: int) -> None:
    rng = np.random.default_rng(n)
    spacing = rng.uniform(0.2, 2.0, n - 1)
    tree = Tree.chain(n, spacing=spacing)
    p, q = random_simplex(rng, 5, n, sparsity=0.5), random_simplex(rng, 5, n)
    ours = emd(t64(p), t64(q), tree, from_logits=False, reduction="none", backend=backend).numpy()
    np.testing.assert_allclose(ours, lp_emd(p, q, tree.distance_matrix()), rtol=1e-9, atol=1e-12)
    support = np.concatenate([[0.0], np.cumsum(spacing)])
    ref = [scipy_stats.wasserstein_distance(support, support, p[i], q[i]) for i in range(5)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_imagenet_tree_matches_lp() -> None:
    from _helpers import shared_data_or_skip

    shared_data_or_skip()
    from emdloss_lab.data import imagenet_tree

    tree = imagenet_tree()
    rng = np.random.default_rng(0)
    p, q = random_simplex(rng, 3, 1000, sparsity=0.9), random_simplex(rng, 3, 1000, sparsity=0.9)
    for backend in BACKENDS:
        ours = emd(t64(p), t64(q), tree, from_logits=False, reduction="none", backend=backend).numpy()
        np.testing.assert_allclose(ours, lp_emd(p, q, tree.distance_matrix()), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_target_rho1_is_expected_distance(backend: str) -> None:
    rng = np.random.default_rng(7)
    tree = random_tree(rng, 40, internal_classes=True)
    logits = t64(rng.normal(size=(5, tree.num_classes)))
    y = torch.as_tensor(rng.integers(0, tree.num_classes, 5))
    p = torch.softmax(logits, 1).numpy()
    expected = (p * tree.distance_matrix()[:, y.numpy()].T).sum(1)
    ours = emd(logits, y, tree, reduction="none", backend=backend).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


@pytest.mark.parametrize("rho", [1.5, 2.0, 3.0])
def test_relaxed_value_is_sum_of_powered_flows(rho: float) -> None:
    """rho != 1 has no LP counterpart; check the definition through independently computed flows."""
    rng = np.random.default_rng(11)
    tree = random_tree(rng, 30, internal_classes=True)
    p, q = random_simplex(rng, 4, tree.num_classes), random_simplex(rng, 4, tree.num_classes)
    # independent flows: for every edge, sum the classes whose path to the root crosses it
    ref = np.zeros(4)
    for v, w in zip(tree.edge_nodes, tree.weights[tree.edge_nodes]):
        below = [k for k, cnode in enumerate(tree.classes) if is_ancestor(tree, int(v), int(cnode))]
        f = p[:, below].sum(1) - q[:, below].sum(1)
        ref += w * np.abs(f) ** rho
    for backend in BACKENDS:
        ours = emd(t64(p), t64(q), tree, rho=rho, from_logits=False, reduction="none", backend=backend).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-10)
    f = flows(t64(p), t64(q), tree).numpy()
    np.testing.assert_allclose((np.abs(f) ** rho) @ tree.weights[tree.edge_nodes], ref, rtol=1e-10)


def test_spatial_inputs_and_reductions() -> None:
    rng = np.random.default_rng(5)
    tree = random_tree(rng, 20)
    c = tree.num_classes
    x = t64(rng.normal(size=(3, c, 4, 2)))
    y = torch.as_tensor(rng.integers(0, c, (3, 4, 2)))
    y[0, 0, 0] = -100
    full = emd(x, y, tree, reduction="none")
    assert full.shape == (3, 4, 2) and full[0, 0, 0] == 0
    rows = emd(x.movedim(1, -1).reshape(-1, c), y.reshape(-1), tree, reduction="none").reshape(3, 4, 2)
    torch.testing.assert_close(full, rows)
    kept = y != -100
    torch.testing.assert_close(emd(x, y, tree, reduction="sum"), full.sum())
    torch.testing.assert_close(emd(x, y, tree), full[kept].mean())
