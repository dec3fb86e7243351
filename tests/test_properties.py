"""Property-based tests (hypothesis): metric axioms, relabelling invariance, no crashes on random trees."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emdloss import Tree
from emdloss.functional import emd

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def trees(draw, max_nodes: int = 25) -> Tree:
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    weights = draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))
    is_leaf = np.ones(n, dtype=bool)
    is_leaf[[p for p in parents if p >= 0]] = False
    candidates = list(range(n))
    classes = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=n, unique=True))
    if draw(st.booleans()):
        classes = np.flatnonzero(is_leaf).tolist()
    return Tree.from_parents(parents, weights=weights, classes=classes)


@st.composite
def tree_and_dists(draw, k: int = 3):
    tree = draw(trees())
    c = tree.num_classes
    rows = []
    for _ in range(k):
        raw = draw(st.lists(st.floats(0.0, 1.0), min_size=c, max_size=c))
        x = np.asarray(raw) + 1e-3
        rows.append(x / x.sum())
    return tree, [torch.as_tensor(r, dtype=torch.float64)[None] for r in rows]


def _emd(p, q, tree, rho=1.0, backend="auto"):
    return float(emd(p, q, tree, rho=rho, from_logits=False, backend=backend))


@SETTINGS
@given(tree_and_dists())
def test_metric_axioms(data) -> None:
    tree, (p, q, r) = data
    assert abs(_emd(p, p, tree)) < 1e-12
    assert _emd(p, q, tree) >= 0
    assert abs(_emd(p, q, tree) - _emd(q, p, tree)) < 1e-12
    assert _emd(p, r, tree) <= _emd(p, q, tree) + _emd(q, r, tree) + 1e-9


@SETTINGS
@given(tree_and_dists(k=2), st.sampled_from([1.0, 1.5, 2.0]))
def test_backends_agree(data, rho) -> None:
    tree, (p, q) = data
    a = _emd(p, q, tree, rho, "torch")
    b = _emd(p, q, tree, rho, "numba")
    assert abs(a - b) <= 1e-10 * max(1.0, abs(a))


@SETTINGS
@given(tree_and_dists(k=2), st.randoms(use_true_random=False))
def test_invariant_to_relabelling_nodes(data, random) -> None:
    tree, (p, q) = data
    n = tree.num_nodes
    perm = list(range(n))
    random.shuffle(perm)  # new id of old node i is perm[i]
    perm = np.asarray(perm)
    parents = np.full(n, -1)
    weights = np.zeros(n)
    for old in range(n):
        parents[perm[old]] = perm[tree.parents[old]] if tree.parents[old] >= 0 else -1
        weights[perm[old]] = tree.weights[old]
    relabelled = Tree.from_parents(parents, weights=weights, classes=perm[tree.classes])
    np.testing.assert_allclose(relabelled.distance_matrix(), tree.distance_matrix(), atol=1e-12)
    assert abs(_emd(p, q, relabelled) - _emd(p, q, tree)) < 1e-10
    for rho in (2.0,):
        assert abs(_emd(p, q, relabelled, rho) - _emd(p, q, tree, rho)) < 1e-10


@SETTINGS
@given(tree_and_dists(k=2))
def test_permuting_classes_with_the_outputs_changes_nothing(data) -> None:
    tree, (p, q) = data
    c = tree.num_classes
    perm = np.random.default_rng(c).permutation(c)
    permuted = Tree.from_parents(tree.parents, weights=tree.weights, classes=tree.classes[perm])
    assert abs(_emd(p[:, perm], q[:, perm], permuted) - _emd(p, q, tree)) < 1e-10


@SETTINGS
@given(trees(), st.floats(-50, 50), st.integers(0, 2**31 - 1))
def test_logits_never_crash_and_are_finite(tree, scale, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, tree.num_classes, generator=g) * scale
    y = torch.randint(0, tree.num_classes, (4,), generator=g)
    x.requires_grad_()
    loss = emd(x, y, tree, rho=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
