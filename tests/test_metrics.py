"""Metrics against independent references: networkx shortest paths, naive ancestor walks, POT's exact LP,
sklearn's top-k accuracy, MAE and quadratic kappa; the torchmetrics classes against the functions, over batches,
merged states (two objects standing for two ranks) and torchmetrics' own DDP sync path with a two-rank gather.
The published distances of Bertinetto et al. are compared in tests/test_metrics_literature.py."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree

from emdloss import Tree
from emdloss import metrics as M

nx = pytest.importorskip("networkx")
#: the Metric classes need the optional extra; the functions above them do not
needs_torchmetrics = pytest.mark.skipif(
    importlib.util.find_spec("torchmetrics") is None,
    reason="torchmetrics is not installed: pip install 'emdloss[metrics]'",
)


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


def _naive_lca_height(tree: Tree, a: int, b: int) -> float:
    """Bertinetto et al.'s distance by ancestor walks: 0 for a == b, else (deepest class depth) - depth(LCA)."""
    if a == b:
        return 0.0
    cls = tree.classes.tolist()
    top = max(len(_ancestors(tree, c)) - 1 for c in cls)
    anc_b = set(_ancestors(tree, cls[b]))
    lca = next(v for v in _ancestors(tree, cls[a]) if v in anc_b)
    return float(top - (len(_ancestors(tree, lca)) - 1))


def _case(seed: int, n_nodes: int = 30, n: int = 200, internal: bool = True):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, n_nodes, internal_classes=internal)
    logits = torch.as_tensor(rng.normal(size=(n, tree.num_classes)) * 2)
    target = torch.as_tensor(rng.integers(0, tree.num_classes, n))
    return tree, logits, target


def _is_scalar(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64


# ---------------------------------------------------------------------- functions vs independent references


@pytest.mark.parametrize("seed", range(4))
def test_path_severity_matches_shortest_paths(seed):
    tree, logits, target = _case(seed)
    pred = logits.argmax(1)
    g = _graph(tree)
    cls = tree.classes.tolist()
    ds = [
        nx.shortest_path_length(g, cls[p], cls[t], weight="weight")
        for p, t in zip(pred.tolist(), target.tolist())
        if p != t
    ]
    got = M.mistake_severity(pred, target, tree, distance="path")
    assert _is_scalar(got) and float(got) == pytest.approx(np.mean(ds), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lca_severity_matches_naive_walk(seed):
    tree, logits, target = _case(seed)
    pred = logits.argmax(1)
    hs = [_naive_lca_height(tree, p, t) for p, t in zip(pred.tolist(), target.tolist()) if p != t]
    got = M.mistake_severity(pred, target, tree)  # "lca" is the default: the literature's mistake severity
    assert _is_scalar(got) and float(got) == pytest.approx(np.mean(hs), rel=1e-12)
    assert float(M.lca_mistake_height(pred, target, tree)) == float(got)  # the 0.1.0 name


def test_severity_on_balanced_tree_by_hand():
    # root 0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5, 6}: sibling mistakes have height 1, cross mistakes height 2.
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 0, 0, 2])
    pred = torch.tensor([0, 1, 2, 3])
    assert float(M.mistake_severity(pred, target, tree)) == pytest.approx((1 + 2 + 1) / 3)
    assert float(M.mistake_severity(pred, target, tree, distance="path")) == pytest.approx((2 + 4 + 2) / 3)
    for distance in ("lca", "path"):
        assert math.isnan(M.mistake_severity(target, target, tree, distance=distance))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_accuracy_matches_sklearn(k):
    from sklearn.metrics import top_k_accuracy_score

    _, logits, target = _case(7, internal=False)
    c = logits.shape[1]
    ref = top_k_accuracy_score(target.numpy(), logits.numpy(), k=k, labels=np.arange(c))
    got = M.topk_accuracy(logits, target, k)
    assert _is_scalar(got) and float(got) == pytest.approx(ref)


@pytest.mark.parametrize("distance", ["lca", "path"])
def test_hierarchical_distance_topk_by_loop(distance):
    """mean_i (1/k) sum_{j in topk_i} d(j, t_i), d from independent references (networkx, ancestor walks);
    a correct prediction counts 0 (on internal classes too, where H - depth(class) is not 0)."""
    tree, logits, target = _case(3)
    k = 4
    if distance == "path":
        g, cls = _graph(tree), tree.classes.tolist()

        def d(a, b):
            return nx.shortest_path_length(g, cls[a], cls[b], weight="weight")
    else:

        def d(a, b):
            return _naive_lca_height(tree, a, b)

    ref = np.mean([np.mean([d(j, t) for j in np.argsort(-row)[:k]]) for row, t in zip(logits.numpy(), target.tolist())])
    got = M.hierarchical_distance_topk(logits, target, tree, k=k, distance=distance)
    assert _is_scalar(got) and float(got) == pytest.approx(ref, rel=1e-12)
    # k = 1 is the mean distance of the top-1 prediction: severity times the error rate
    pred = logits.argmax(1)
    err = float((pred != target).double().mean())
    assert float(M.hierarchical_distance_topk(logits, target, tree, k=1, distance=distance)) == pytest.approx(
        float(M.mistake_severity(pred, target, tree, distance=distance)) * err
    )


def test_class_distance_matrix_is_symmetric_with_zero_diagonal():
    tree, _, _ = _case(2)
    for distance in M.DISTANCES:
        d = M.class_distance_matrix(tree, distance)
        assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0) and d.dtype == torch.float64
    with pytest.raises(ValueError, match="distance must be 'lca'"):
        M.class_distance_matrix(tree, "hops")


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
    qwk = M.quadratic_weighted_kappa(tp, tt, k)
    assert _is_scalar(qwk) and float(qwk) == pytest.approx(
        cohen_kappa_score(target, pred, weights="quadratic"), abs=1e-12
    )
    mae = M.mean_absolute_error(tp, tt)
    assert _is_scalar(mae) and float(mae) == pytest.approx(mean_absolute_error(target, pred))
    assert float(M.quadratic_weighted_kappa(tt, tt, k)) == pytest.approx(1.0)
    assert math.isnan(M.quadratic_weighted_kappa(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), k))


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
    with pytest.raises(ValueError, match=r"distance must be 'lca' \(height of the lowest common ancestor"):
        M.hierarchical_distance_topk(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), tree, 1, distance="hop")


# ---------------------------------------------------------------------- regressions: precision, bad values, spatial input
@needs_torchmetrics
def test_path_severity_keeps_short_edges_below_long_ones():
    """Two leaves 1e-8 below a node 1e9 below the root: their distance is 2e-8 (it was 0 by depth differences)."""
    tree = Tree.from_parents([-1, 0, 1, 1], weights=[0, 1e9, 1e-8, 1e-8])
    pred, target = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    assert float(M.mistake_severity(pred, target, tree, distance="path")) == 2e-8
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]], dtype=torch.float64)
    got = M.hierarchical_distance_topk(logits, target, tree, k=1, distance="path")
    assert float(got) == pytest.approx(2 * 2e-8 / 3, rel=1e-12)
    m = M.HierarchicalMetrics(tree, k=1)
    m.update(logits, target)
    assert float(m.compute()["severity_path"]) == 2e-8
    assert float(m.compute()["severity_lca"]) == 1.0


BAD_LOGITS = {"nan": math.nan, "+inf": math.inf, "-inf row": -math.inf}
LOGITS_MESSAGE = r"logits contain NaN or infinite values \(NaN, \+inf, or a row of only -inf\)"


def _states_zero(m) -> bool:
    return all(bool(getattr(x, name).eq(0).all()) for x in m.values() for name in x._defaults)


@needs_torchmetrics
@pytest.mark.parametrize("bad", list(BAD_LOGITS))
@pytest.mark.parametrize("entry", ["topk_accuracy", "hierarchical_distance_topk", "HierarchicalMetrics"])
def test_non_finite_logits_are_named_by_every_entry_point(bad, entry):
    """NaN or +inf logits (or a row of only -inf) are a ValueError that says so, in the functions and in the
    collection, which checks a batch before any of its metrics adds it."""
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
    assert _states_zero(m)  # a rejected batch adds nothing


@needs_torchmetrics
def test_minus_inf_logits_and_ignored_rows_are_accepted():
    """As for the losses (and cross_entropy): -inf is probability 0, and an ignored row is not read."""
    tree = Tree.chain(4)
    logits = torch.tensor([[0.0, -math.inf, 1.0, 2.0], [math.nan] * 4, [3.0, 0.0, -math.inf, 0.0]])
    target = torch.tensor([3, -100, 0])
    m = M.HierarchicalMetrics(tree, k=2)
    m.update(logits, target)
    assert float(m.compute()["top1"]) == 1.0 and float(m.compute()["count"]) == 2
    assert float(M.topk_accuracy(logits[[0, 2]], target[[0, 2]], 1)) == 1.0


@needs_torchmetrics
def test_non_finite_probabilities_are_named():
    tree = Tree.chain(4)
    probs = torch.full((2, 4), 0.25)
    probs[0, 1] = math.nan
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="probs contain NaN or infinite values"):
        M.emd_per_sample(probs, target, tree)
    with pytest.raises(ValueError, match=r"probabilities \(from_logits=False\) contain NaN or infinite values"):
        M.HierarchicalMetrics(tree, k=1, from_logits=False).update(probs, target)


@needs_torchmetrics
def test_spatial_inputs_count_every_position():
    """(N, C, d1, d2) logits and (N, d1, d2) targets, classes along dim 1 as in the losses: the same as the
    flattened rows."""
    tree, logits, target = _case(5, n=2 * 3 * 4)
    spatial = logits.reshape(2, 3, 4, -1).permute(0, 3, 1, 2)  # (N, C, 3, 4)
    spatial_target = target.reshape(2, 3, 4).clone()
    spatial_target[1, 2, 3] = -100
    flat_target = spatial_target.reshape(-1)
    m_spatial, m_flat = M.HierarchicalMetrics(tree, k=3), M.HierarchicalMetrics(tree, k=3)
    m_spatial.update(spatial, spatial_target)
    m_flat.update(logits, flat_target)
    a, b = m_spatial.compute(), m_flat.compute()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) and float(a["count"]) == 23
    assert torch.equal(M.topk_accuracy(spatial, target.reshape(2, 3, 4), 2), M.topk_accuracy(logits, target, 2))
    assert float(M.hierarchical_distance_topk(spatial, target.reshape(2, 3, 4), tree, 2)) == pytest.approx(
        float(M.hierarchical_distance_topk(logits, target, tree, 2)), rel=1e-12
    )
    with pytest.raises(ValueError, match=r"target must have shape \(N, d1, ..., dk\) = \(2, 3, 4\)"):
        m_spatial.update(spatial, target)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\) or \(N, C, d1, ..., dk\)"):
        M.topk_accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------- torchmetrics classes


def _functional(logits: torch.Tensor, y: torch.Tensor, tree: Tree, k: int) -> dict[str, float]:
    """What each class must return, from the functions on the whole data (ignored targets removed)."""
    keep = y != -100
    x, t = logits[keep], y[keep]
    pred = x.argmax(1)
    c = tree.num_classes
    return {
        "count": float(t.numel()),
        "top1": float(M.topk_accuracy(x, t, 1)),
        f"top{k}": float(M.topk_accuracy(x, t, k)),
        "severity_lca": float(M.mistake_severity(pred, t, tree, "lca")),
        "severity_path": float(M.mistake_severity(pred, t, tree, "path")),
        f"hdist_lca@{k}": float(M.hierarchical_distance_topk(x, t, tree, k, "lca")),
        f"hdist_path@{k}": float(M.hierarchical_distance_topk(x, t, tree, k, "path")),
        "emd": float(M.emd_per_sample(x.softmax(1), t, tree).mean()),
        "mae": float(M.mean_absolute_error(pred, t)),
        "qwk": float(M.quadratic_weighted_kappa(pred, t, c)),
    }


def _classes(tree: Tree, k: int) -> dict:
    c = tree.num_classes
    return {
        "count": M.SampleCount(),
        "top1": M.TopKAccuracy(1),
        f"top{k}": M.TopKAccuracy(k),
        "severity_lca": M.MistakeSeverity(tree),
        "severity_path": M.MistakeSeverity(tree, distance="path"),
        f"hdist_lca@{k}": M.HierarchicalDistanceAtK(tree, k),
        f"hdist_path@{k}": M.HierarchicalDistanceAtK(tree, k, distance="path"),
        "emd": M.EarthMoversDistance(tree),
        "mae": M.OrdinalMAE(c),
        "qwk": M.QuadraticWeightedKappa(c),
    }


def _data(seed: int = 11, n: int = 203):
    tree, logits, target = _case(seed, n=n)
    target[5] = -100  # ignored by every metric
    return tree, logits, target


def _check(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for key in ref:
        assert _is_scalar(got[key]), key
        assert float(got[key]) == pytest.approx(ref[key], rel=1e-12, nan_ok=True), key


@needs_torchmetrics
def test_each_class_equals_its_function_over_batches():
    tree, logits, target = _data()
    k = 3
    ref = _functional(logits, target, tree, k)
    ms = _classes(tree, k)
    for lo in range(0, 203, 50):
        for m in ms.values():
            m.update(logits[lo : lo + 50], target[lo : lo + 50])
    _check({key: m.compute() for key, m in ms.items()}, ref)
    # class-index predictions give the same as scores where only the top-1 counts
    pred = logits.argmax(1)
    for key in ("severity_lca", "severity_path", "mae", "qwk"):
        m = _classes(tree, k)[key]
        m.update(pred, target)
        assert float(m.compute()) == pytest.approx(ref[key], rel=1e-12)
    for m in ms.values():
        m.reset()
        assert _states_zero({"m": m})


@needs_torchmetrics
def test_collection_equals_functions_and_forward_gives_batch_values():
    tree, logits, target = _data()
    k = 3
    m = M.HierarchicalMetrics(tree, k=k, confusion=True)
    for lo in range(0, 203, 50):
        batch = m(logits[lo : lo + 50], target[lo : lo + 50])  # forward: this batch's values, and accumulates
        _check(batch, _functional(logits[lo : lo + 50], target[lo : lo + 50], tree, k))
    out = m.compute()
    _check(out, _functional(logits, target, tree, k))
    _check(m.compute(), {key: float(v) for key, v in out.items()})  # compute does not consume the state
    m.reset()
    with pytest.warns(UserWarning, match="compute"):  # torchmetrics warns: compute before update
        assert math.isnan(m.compute()["top1"])


def _two_rank_gather(other):
    """A ``dist_sync_fn`` for torchmetrics that answers each all-gather as two ranks would: [this rank's state,
    ``other``'s state]. torchmetrics gathers the states in the order they were added (``_reductions``)."""
    others = itertools.cycle([getattr(other, name) for name in other._reductions])

    def gather(x: torch.Tensor, group=None) -> list[torch.Tensor]:
        return [x, next(others)]

    return gather


@needs_torchmetrics
def test_two_ranks_merged_and_synced_equal_the_global_data():
    """Rank 0 sees the first 120 samples, rank 1 the rest. ``merge_state`` (two objects) and torchmetrics' own
    DDP sync path (``dist_sync_fn`` answering the all-gathers with the other rank's states, reduced by each
    state's ``dist_reduce_fx``) both give the metrics of all the data; after the synced compute the local state
    is back to rank 0's alone."""
    tree, logits, target = _data()
    k = 3
    ref = _functional(logits, target, tree, k)
    rank0, rank1 = _classes(tree, k), _classes(tree, k)
    for key in ref:
        rank0[key].update(logits[:120], target[:120])
        rank1[key].update(logits[120:], target[120:])
    # on copies: torchmetrics caches compute()'s value, and merge_state does not clear that cache
    local0 = {key: float(copy.deepcopy(m).compute()) for key, m in rank0.items()}

    synced = {}
    for key, m in rank0.items():
        twin = type(m).__new__(type(m))  # the same metric, built with the fake two-rank gather
        kwargs = {"dist_sync_fn": _two_rank_gather(rank1[key]), "distributed_available_fn": lambda: True}
        args = {
            M.SampleCount: (),
            M.TopKAccuracy: (m.k,) if isinstance(m, M.TopKAccuracy) else (),
            M.MistakeSeverity: (tree, getattr(m, "distance", None)),
            M.HierarchicalDistanceAtK: (tree, getattr(m, "k", None), getattr(m, "distance", None)),
            M.EarthMoversDistance: (tree,),
            M.OrdinalMAE: (tree.num_classes,),
            M.QuadraticWeightedKappa: (tree.num_classes,),
        }[type(m)]
        twin.__init__(*args, **kwargs)
        twin.update(logits[:120], target[:120])
        synced[key] = twin.compute()
        assert float(twin.compute()) == pytest.approx(float(synced[key]), nan_ok=True)  # unsynced after compute
        for name in twin._defaults:  # the local state is rank 0's again
            assert torch.equal(getattr(twin, name), getattr(m, name)), (key, name)
    _check(synced, ref)

    for key, m in rank0.items():
        m.merge_state(rank1[key])
    _check({key: m.compute() for key, m in rank0.items()}, ref)
    assert any(local0[key] != pytest.approx(ref[key], nan_ok=True) for key in ref)  # the halves differ


@needs_torchmetrics
def test_collection_in_a_module_state_dict_and_repr():
    """The collection moves with its module, adds nothing to its state_dict (metric states are not persistent,
    so checkpoints load into a model without it), and its repr names the tree and the settings."""
    tree = Tree.chain(5)
    model = torch.nn.Module()
    model.metrics = M.HierarchicalMetrics(tree, k=2, prefix="val/")
    model.layer = torch.nn.Linear(3, 5)
    assert set(model.state_dict()) == {"layer.weight", "layer.bias"}
    text = repr(model.metrics)
    assert "Tree(chain, num_nodes=5, num_classes=5), k=2" in text
    assert "(severity_lca): MistakeSeverity(Tree(chain, num_nodes=5, num_classes=5), distance='lca')" in text
    model.metrics.update(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert set(model.metrics.compute()) == {
        "val/count", "val/top1", "val/top2", "val/severity_lca", "val/severity_path",
        "val/hdist_lca@2", "val/hdist_path@2", "val/emd",
    }  # fmt: skip


@needs_torchmetrics
def test_class_arguments_and_devices_are_checked():
    tree = Tree.chain(4)
    with pytest.raises(ValueError, match="k must be"):
        M.HierarchicalDistanceAtK(tree, k=5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        M.TopKAccuracy(0)
    with pytest.raises(ValueError, match="distance must be"):
        M.MistakeSeverity(tree, distance="hops")
    with pytest.raises(TypeError, match=r"tree must be an emdloss\.Tree"):
        M.EarthMoversDistance(None)
    with pytest.raises(ValueError, match="num_classes"):
        M.QuadraticWeightedKappa(0)
    with pytest.raises(ValueError, match="preds must be class indices of target's shape"):
        M.OrdinalMAE().update(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="preds has 4 classes but the tree has 5"):
        M.HierarchicalDistanceAtK(Tree.chain(5), k=2).update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    m = M.TopKAccuracy(1)
    m.to("meta")  # states elsewhere than the inputs: a clear error, not a device-mismatch traceback
    with pytest.raises(ValueError, match=r"TopKAccuracy is on meta but the inputs are on cpu: move the metric"):
        m.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_import_stays_light_and_missing_torchmetrics_names_the_extra(monkeypatch):
    """`import emdloss.metrics` does not import torchmetrics; without it, the classes raise an ImportError that
    says `pip install 'emdloss[metrics]'` while the functions keep working. (In this process, with
    torchmetrics made unimportable and emdloss.metrics imported afresh; the old modules are put back after.)"""
    import importlib

    import emdloss

    for name in [m for m in sys.modules if m == "torchmetrics" or m.startswith(("torchmetrics.", "emdloss.metrics"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed: every import of it fails
    monkeypatch.setattr(emdloss, "metrics", emdloss.metrics)
    fresh = importlib.import_module("emdloss.metrics")  # succeeds, so it does not import torchmetrics
    assert fresh is not M
    assert float(fresh.topk_accuracy(torch.eye(3), torch.arange(3))) == 1.0
    with pytest.raises(ImportError, match=r"pip install 'emdloss\[metrics\]'"):
        fresh.TopKAccuracy  # noqa: B018
