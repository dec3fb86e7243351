"""Metrics against independent references: networkx shortest paths, naive ancestor walks, POT's exact LP,
sklearn's top-k accuracy and quadratic kappa; the accumulator against the functional metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree, shared_data_or_skip

from emdloss import Tree
from emdloss import metrics as M

nx = pytest.importorskip("networkx")


def _graph(tree: Tree):
    g = nx.Graph()
    for v, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            g.add_edge(v, p, weight=float(tree.weights[v]))
    return g


def _ancestors(tree: Tree, v: int) -> list[int]:
    out = []
    while v != -1:
        out.append(v)
        v = int(tree.parents[v])
    return out  # v, parent, ..., root


def _case(seed: int, n_nodes: int = 30, n: int = 200, internal: bool = True):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, n_nodes, internal_classes=internal)
    logits = torch.as_tensor(rng.normal(size=(n, tree.num_classes)) * 2)
    target = torch.as_tensor(rng.integers(0, tree.num_classes, n))
    return tree, logits, target


@pytest.mark.parametrize("seed", range(4))
def test_mistake_severity_matches_shortest_paths(seed):
    tree, logits, target = _case(seed)
    pred = logits.argmax(1)
    g = _graph(tree)
    cls = tree.classes.tolist()
    ds = [
        nx.shortest_path_length(g, cls[p], cls[t], weight="weight")
        for p, t in zip(pred.tolist(), target.tolist())
        if p != t
    ]
    assert M.mistake_severity(pred, target, tree) == pytest.approx(np.mean(ds), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lca_height_matches_naive_walk(seed):
    tree, logits, target = _case(seed)
    pred = logits.argmax(1)
    cls = tree.classes.tolist()
    top = max(len(_ancestors(tree, c)) - 1 for c in cls)  # deepest class level, in hops
    hs = []
    for p, t in zip(pred.tolist(), target.tolist()):
        if p == t:
            continue
        anc_t = set(_ancestors(tree, cls[t]))
        lca = next(v for v in _ancestors(tree, cls[p]) if v in anc_t)
        hs.append(top - (len(_ancestors(tree, lca)) - 1))
    assert M.lca_mistake_height(pred, target, tree) == pytest.approx(np.mean(hs), rel=1e-12)


def test_lca_height_on_balanced_tree_by_hand():
    # root 0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5, 6}: sibling mistakes have height 1, cross mistakes height 2.
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 0, 0, 2])
    pred = torch.tensor([0, 1, 2, 3])
    assert M.lca_mistake_height(pred, target, tree) == pytest.approx((1 + 2 + 1) / 3)
    assert M.mistake_severity(pred, target, tree) == pytest.approx((2 + 4 + 2) / 3)
    assert math.isnan(M.mistake_severity(target, target, tree))
    assert math.isnan(M.lca_mistake_height(target, target, tree))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_accuracy_matches_sklearn(k):
    from sklearn.metrics import top_k_accuracy_score

    _, logits, target = _case(7, internal=False)
    c = logits.shape[1]
    ref = top_k_accuracy_score(target.numpy(), logits.numpy(), k=k, labels=np.arange(c))
    assert M.topk_accuracy(logits, target, k) == pytest.approx(ref)


def test_hierarchical_distance_topk_by_loop():
    tree, logits, target = _case(3)
    d = tree.distance_matrix()
    k = 4
    ref = np.mean([np.mean(d[np.argsort(-row)[:k], t]) for row, t in zip(logits.numpy(), target.tolist())])
    assert M.hierarchical_distance_topk(logits, target, tree, k=k) == pytest.approx(ref, rel=1e-12)
    # k = 1 is the mean distance of the argmax, i.e. severity times the error rate
    pred = logits.argmax(1)
    err = float((pred != target).double().mean())
    assert M.hierarchical_distance_topk(logits, target, tree, k=1) == pytest.approx(
        M.mistake_severity(pred, target, tree) * err
    )


@pytest.mark.parametrize("seed", range(3))
def test_emd_per_sample_matches_pot(seed):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 25, internal_classes=True)
    probs = random_simplex(rng, 8, tree.num_classes, sparsity=0.3)
    target = rng.integers(0, tree.num_classes, 8)
    got = M.emd_per_sample(torch.as_tensor(probs), torch.as_tensor(target), tree)
    assert got.shape == (8,)
    d = tree.distance_matrix()
    for i in range(8):
        q = np.zeros(tree.num_classes)
        q[target[i]] = 1.0
        assert float(got[i]) == pytest.approx(ot.emd2(probs[i], q, d), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_ordinal_metrics_match_sklearn(seed):
    from sklearn.metrics import cohen_kappa_score, mean_absolute_error

    rng = np.random.default_rng(seed)
    k = 6
    target = rng.integers(0, k, 300)
    pred = np.clip(target + rng.integers(-2, 3, 300), 0, k - 1)
    tp, tt = torch.as_tensor(pred), torch.as_tensor(target)
    assert M.quadratic_weighted_kappa(tp, tt, k) == pytest.approx(
        cohen_kappa_score(target, pred, weights="quadratic"), abs=1e-12
    )
    assert M.mean_absolute_error(tp, tt) == pytest.approx(mean_absolute_error(target, pred))
    assert M.quadratic_weighted_kappa(tt, tt, k) == pytest.approx(1.0)


def test_accumulator_equals_functional_over_batches():
    tree, logits, target = _case(11, n=203)
    target[5] = -100  # ignored
    m = M.HierarchicalMetrics(tree, k=3, confusion=True)
    for lo in range(0, 203, 50):
        m.update(logits[lo : lo + 50], target[lo : lo + 50])
    out = m.compute()
    keep = target != -100
    lg, y = logits[keep], target[keep]
    pred = lg.argmax(1)
    assert out["count"] == 202
    assert out["top1"] == pytest.approx(M.topk_accuracy(lg, y, 1))
    assert out["top3"] == pytest.approx(M.topk_accuracy(lg, y, 3))
    assert out["mistake_severity"] == pytest.approx(M.mistake_severity(pred, y, tree))
    assert out["lca_mistake_height"] == pytest.approx(M.lca_mistake_height(pred, y, tree))
    assert out["hdist@3"] == pytest.approx(M.hierarchical_distance_topk(lg, y, tree, 3))
    assert out["emd"] == pytest.approx(float(M.emd_per_sample(lg.softmax(1), y, tree).mean()))
    assert out["mae"] == pytest.approx(M.mean_absolute_error(pred, y))
    assert out["qwk"] == pytest.approx(M.quadratic_weighted_kappa(pred, y, tree.num_classes))
    assert m.compute() == out  # compute does not consume state
    m.reset()
    assert math.isnan(m.compute()["top1"])


def test_bad_arguments_are_named():
    tree = Tree.chain(4)
    with pytest.raises(TypeError, match="pred"):
        M.mistake_severity(torch.zeros(3), torch.zeros(3, dtype=torch.long), tree)
    with pytest.raises(ValueError, match="target contains class index 9"):
        M.mistake_severity(torch.zeros(3, dtype=torch.long), torch.tensor([0, 9, 1]), tree)
    with pytest.raises(ValueError, match="k must be"):
        M.topk_accuracy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), k=5)
    with pytest.raises(TypeError, match="tree"):
        M.mistake_severity(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="num_classes"):
        M.quadratic_weighted_kappa(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 0)


def test_lca_height_matches_making_better_mistakes_distances():
    """Bertinetto et al. publish LCA heights for every ImageNet leaf pair; ours must equal them."""
    import lzma

    root = shared_data_or_skip()
    from emdloss_lab.data import imagenet_tree

    tree = imagenet_tree()
    wnids = [tree.names[c] for c in tree.classes.tolist()]
    index = {w: i for i, w in enumerate(wnids)}
    path = root / "hierarchies/making-better-mistakes/imagenet_ilsvrc_distances.txt.xz"
    a, b, ref = [], [], []
    with lzma.open(path, "rt") as fh:
        for line in fh:
            x, y, dist = line.split()
            if x != y and x in index and y in index:
                a.append(index[x])
                b.append(index[y])
                ref.append(float(dist))
    assert len(ref) == 1000 * 999 // 2
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ref), 20000, replace=False)
    pred = torch.as_tensor(np.asarray(a)[pick])
    target = torch.as_tensor(np.asarray(b)[pick])
    h = M._lca_height_tensor(tree, torch.device("cpu"))
    assert np.array_equal(h[pred, target].numpy(), np.asarray(ref)[pick])
    assert M.lca_mistake_height(pred, target, tree) == pytest.approx(np.asarray(ref)[pick].mean())


# ------------------------------------------------------------------ regressions: precision, bad values, spatial input
def test_mistake_severity_keeps_short_edges_below_long_ones():
    """Two leaves 1e-8 below a node 1e9 below the root: their distance is 2e-8 (it was 0 by depth differences)."""
    tree = Tree.from_parents([-1, 0, 1, 1], weights=[0, 1e9, 1e-8, 1e-8])
    pred, target = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    assert M.mistake_severity(pred, target, tree) == 2e-8
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]], dtype=torch.float64)
    assert M.hierarchical_distance_topk(logits, target, tree, k=1) == pytest.approx(2 * 2e-8 / 3, rel=1e-12)
    m = M.HierarchicalMetrics(tree, k=1)
    m.update(logits, target)
    assert m.compute()["mistake_severity"] == 2e-8
    assert m.compute()["lca_mistake_height"] == 1.0


BAD_LOGITS = {"nan": math.nan, "+inf": math.inf, "-inf row": -math.inf}
LOGITS_MESSAGE = r"logits contain NaN or infinite values \(NaN, \+inf, or a row of only -inf\)"


@pytest.mark.parametrize("bad", list(BAD_LOGITS))
@pytest.mark.parametrize("entry", ["topk_accuracy", "hierarchical_distance_topk", "HierarchicalMetrics"])
def test_non_finite_logits_are_named_by_every_entry_point(bad, entry):
    """NaN or +inf logits (or a row of only -inf) are a ValueError that says so, in the functions and in the
    accumulator (which blamed the probabilities, as if from_logits were False); topk_accuracy scored them."""
    tree = Tree.chain(4)
    logits = torch.zeros(3, 4)
    if bad == "-inf row":
        logits[1] = -math.inf
    else:
        logits[1, 2] = BAD_LOGITS[bad]
    target = torch.tensor([0, 1, 2])
    m = M.HierarchicalMetrics(tree, k=2)
    call = {
        "topk_accuracy": lambda: M.topk_accuracy(logits, target, 2),
        "hierarchical_distance_topk": lambda: M.hierarchical_distance_topk(logits, target, tree, 2),
        "HierarchicalMetrics": lambda: m.update(logits, target),
    }[entry]
    with pytest.raises(ValueError, match=LOGITS_MESSAGE):
        call()
    assert m.sums.eq(0).all()  # a rejected batch adds nothing


def test_minus_inf_logits_and_ignored_rows_are_accepted():
    """As for the losses (and cross_entropy): -inf is probability 0, and an ignored row is not read."""
    tree = Tree.chain(4)
    logits = torch.tensor([[0.0, -math.inf, 1.0, 2.0], [math.nan] * 4, [3.0, 0.0, -math.inf, 0.0]])
    target = torch.tensor([3, -100, 0])
    m = M.HierarchicalMetrics(tree, k=2)
    m.update(logits, target)
    assert m.compute()["top1"] == 1.0 and m.compute()["count"] == 2
    assert M.topk_accuracy(logits[[0, 2]], target[[0, 2]], 1) == 1.0


def test_non_finite_probabilities_are_named():
    tree = Tree.chain(4)
    probs = torch.full((2, 4), 0.25)
    probs[0, 1] = math.nan
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="probs contain NaN or infinite values"):
        M.emd_per_sample(probs, target, tree)
    with pytest.raises(ValueError, match=r"probabilities \(from_logits=False\) contain NaN or infinite values"):
        M.HierarchicalMetrics(tree, k=1, from_logits=False).update(probs, target)


def test_spatial_inputs_count_every_position():
    """(N, C, d1, d2) logits and (N, d1, d2) targets, classes along dim 1 as in the losses: the same as the
    flattened rows (the accumulator raised a raw IndexError; the functions only took (N, C))."""
    tree, logits, target = _case(5, n=2 * 3 * 4)
    spatial = logits.reshape(2, 3, 4, -1).permute(0, 3, 1, 2)  # (N, C, 3, 4)
    spatial_target = target.reshape(2, 3, 4).clone()
    spatial_target[1, 2, 3] = -100
    flat_target = spatial_target.reshape(-1)
    m_spatial, m_flat = M.HierarchicalMetrics(tree, k=3), M.HierarchicalMetrics(tree, k=3)
    m_spatial.update(spatial, spatial_target)
    m_flat.update(logits, flat_target)
    assert m_spatial.compute() == m_flat.compute() and m_spatial.compute()["count"] == 23
    assert M.topk_accuracy(spatial, target.reshape(2, 3, 4), 2) == M.topk_accuracy(logits, target, 2)
    assert M.hierarchical_distance_topk(spatial, target.reshape(2, 3, 4), tree, 2) == pytest.approx(
        M.hierarchical_distance_topk(logits, target, tree, 2), rel=1e-12
    )
    with pytest.raises(ValueError, match=r"target must have shape \(N, d1, ..., dk\) = \(2, 3, 4\)"):
        m_spatial.update(spatial, target)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\) or \(N, C, d1, ..., dk\)"):
        M.topk_accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
