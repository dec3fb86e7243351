"""Tree construction, validation, DFS structure, distances and JSON round-trips."""

from __future__ import annotations

import json
import pickle
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from _helpers import is_ancestor, random_tree

from emdloss import Tree, TreeError


def bfs_distances(tree: Tree) -> np.ndarray:
    """Independent reference: class-to-class path lengths by graph search over an adjacency list."""
    n = tree.num_nodes
    adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for v in range(n):
        p = int(tree.parents[v])
        if p >= 0:
            adj[v].append((p, float(tree.weights[v])))
            adj[p].append((v, float(tree.weights[v])))
    out = np.zeros((tree.num_classes, tree.num_classes))
    for a, src in enumerate(tree.classes):
        dist = np.full(n, np.nan)
        dist[src] = 0.0
        queue = deque([int(src)])
        while queue:
            u = queue.popleft()
            for v, w in adj[u]:
                if np.isnan(dist[v]):
                    dist[v] = dist[u] + w
                    queue.append(v)
        out[a] = dist[tree.classes]
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", ["recursive", "deep", "bushy"])
def test_dfs_intervals_are_subtrees(seed: int, shape: str) -> None:
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(2, 40)), shape=shape, internal_classes=True)
    n = tree.num_nodes
    assert sorted(tree.preorder.tolist()) == list(range(n))
    assert tree.preorder[0] == tree.root
    for v in range(n):
        lo = tree.position[v]
        below = set(tree.preorder[lo : tree.subtree_end[lo]].tolist())
        expected = {u for u in range(n) if is_ancestor(tree, v, u)}
        assert below == expected


@pytest.mark.parametrize("seed", range(8))
def test_distance_matrix_matches_graph_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(2, 50)), internal_classes=bool(seed % 2))
    np.testing.assert_allclose(tree.distance_matrix(), bfs_distances(tree), rtol=1e-12, atol=1e-12)


def test_chain_distances_and_spacing() -> None:
    tree = Tree.chain(5, spacing=[1.0, 2.0, 0.5, 3.0])
    d = tree.distance_matrix()
    cum = np.concatenate([[0], np.cumsum([1.0, 2.0, 0.5, 3.0])])
    np.testing.assert_allclose(d, np.abs(cum[:, None] - cum[None, :]))
    assert tree.is_chain and tree.num_classes == 5 and tree.num_nodes == 5
    assert not Tree.from_parents([-1, 0, 0]).is_chain


def test_defaults_leaves_in_increasing_id() -> None:
    tree = Tree.from_parents([-1, 0, 0, 1, 1])
    assert tree.classes.tolist() == [2, 3, 4]
    assert tree.num_edges == 4
    np.testing.assert_array_equal(tree.weights, [0, 1, 1, 1, 1])


def test_from_edges_names_and_internal_classes() -> None:
    edges = [("animal", "dog"), ("animal", "cat"), ("root", "animal"), ("root", "car")]
    tree = Tree.from_edges(edges, classes=["dog", "cat", "car", "animal"], weights=[1.0, 2.0, 0.5, 4.0])
    d = tree.distance_matrix()
    assert d[0, 1] == 3.0  # dog - animal - cat
    assert d[0, 2] == 1.0 + 0.5 + 4.0
    assert d[0, 3] == 1.0  # dog to its parent class "animal"
    assert tree.names[tree.root] == "root"


def test_json_round_trip_and_pickle(tmp_path) -> None:
    rng = np.random.default_rng(3)
    tree = random_tree(rng, 30, internal_classes=True)
    path = tmp_path / "tree.json"
    tree.save(path)
    assert Tree.load(path) == tree
    assert Tree.from_dict(json.loads(path.read_text())) == tree
    assert pickle.loads(pickle.dumps(tree)) == tree
    named = Tree.from_edges([("根", "ü"), ("根", "😀 x")], classes=["😀 x", "ü"])
    named.save(path)
    back = Tree.load(path)
    assert back == named and back.names == named.names
    assert hash(back) == hash(named)


def test_tree_is_immutable() -> None:
    tree = Tree.chain(3)
    with pytest.raises(AttributeError):
        tree.root = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        tree.parents[0] = 2


# ------------------------------------------------------------------ bad trees: each error names the problem
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(parents=[1, 0]), "no root"),
        (dict(parents=[-1, 2, 1]), "cycle"),
        (dict(parents=[-1, 2, 3, 1]), "cycle"),
        (dict(parents=[-1, 1]), "own parent"),
        (dict(parents=[-1, -1, 0]), "several roots"),
        (dict(parents=[-1, 5]), "out of range"),
        (dict(parents=[-1, -2]), "out of range"),
        (dict(parents=[]), "at least one node"),
        (dict(parents=[[-1, 0]]), "1-D"),
        (dict(parents=[-1, 0.5]), "integers"),
        (dict(parents=["a", "b"]), "integers"),
        (dict(parents=[-1, 0], weights=[0, -1]), ">= 0"),
        (dict(parents=[-1, 0], weights=[0, np.nan]), "finite"),
        (dict(parents=[-1, 0], weights=[0, np.inf]), "finite"),
        (dict(parents=[-1, 0], weights=[1]), "one entry per node"),
        (dict(parents=[-1, 0, 0], classes=[1, 3]), "out of range"),
        (dict(parents=[-1, 0, 0], classes=[1, 1]), "repeated"),
        (dict(parents=[-1, 0, 0], classes=[]), "empty"),
        (dict(parents=[-1, 0], names=["a", "a"]), "duplicate name"),
        (dict(parents=[-1, 0], names=["a"]), "one entry per node"),
        (dict(parents=[-1, 0], names=["a", 3]), "must be a str"),
    ],
)
def test_bad_trees_raise_clear_errors(kwargs, message) -> None:
    with pytest.raises(TreeError, match=message):
        Tree.from_parents(**kwargs)


def test_cycle_message_lists_the_cycle_by_name() -> None:
    with pytest.raises(TreeError, match=r"cycle in the hierarchy: 1 \('b'\) -> 2 \('c'\) -> 1 \('b'\)"):
        Tree.from_parents([-1, 2, 1], names=["a", "b", "c"])


@pytest.mark.parametrize(
    "edges, classes, message",
    [
        ([("a", "b"), ("a", "c")], ["b", "x"], "unknown class name"),
        ([("a", "b"), ("c", "b")], ["b"], "several parents"),
        ([("a", "b"), ("a", "b")], ["b"], "duplicate edge"),
        ([("a", "b"), ("b", "a")], ["b"], "no root"),
        ([("a", "b"), ("b", "c"), ("c", "b")], ["c"], "several parents"),
        ([("a", "b"), ("x", "y")], ["b", "y"], "several roots"),
        ([("a", "b", "c")], ["b"], "pair"),
    ],
)
def test_bad_edges_raise_clear_errors(edges, classes, message) -> None:
    with pytest.raises(TreeError, match=message):
        Tree.from_edges(edges, classes)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"parents": [-1, 0], "classes": [1]', "malformed or truncated"),
        ('{"parents": [-1, 0], "classes": [1], "extra": 1}', "unknown keys"),
        ('{"parents": [-1, 0]}', "missing required keys"),
        ('{"parents": [-1, 0], "classes": [1], "weights": [0, NaN]}', "NaN"),
        ('{"parents": [-1, 0], "classes": [1], "weights": [0, -Infinity]}', "Infinity"),
        ('{"parents": [-1, 0], "classes": [1], "format": "other"}', "not an emdloss tree"),
        ('{"parents": [-1, 0], "classes": [1], "version": 99}', "version"),
        ("[1, 2]", "JSON object"),
        ('{"parents": [1, 0], "classes": [1]}', "no root"),
    ],
)
def test_bad_json_raises_clear_errors(tmp_path, text, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TreeError, match=message):
        Tree.load(path)


def test_chain_arguments_validated() -> None:
    with pytest.raises(TreeError, match="positive integer"):
        Tree.chain(0)
    with pytest.raises(TreeError, match="spacing"):
        Tree.chain(3, spacing=[1.0])
    with pytest.raises(TreeError, match=">= 0"):
        Tree.chain(3, spacing=[1.0, -1.0])


# ------------------------------------------------------------------ distances are path sums: no cancellation
def _exact_pairs(tree: Tree) -> tuple[list[list[Fraction]], list[list[int]], list[list[int]]]:
    """Independent reference by ancestor walks: exact path lengths (sums of the float64 edge lengths as
    Fractions), hop counts, and the LCA node of every pair of classes."""
    cls = tree.classes.tolist()
    ancestors = []
    for v in cls:
        path = [v]
        while tree.parents[path[-1]] >= 0:
            path.append(int(tree.parents[path[-1]]))
        ancestors.append(path)  # v, parent, ..., root
    exact, hops, lca = [], [], []
    for pa in ancestors:
        row_d, row_h, row_l = [], [], []
        for pb in ancestors:
            common = next(v for v in pa if v in set(pb))
            ia, ib = pa.index(common), pb.index(common)
            row_d.append(sum((Fraction(float(tree.weights[v])) for v in pa[:ia] + pb[:ib]), Fraction(0)))
            row_h.append(ia + ib)
            row_l.append(common)
        exact.append(row_d)
        hops.append(row_h)
        lca.append(row_l)
    return exact, hops, lca


def test_distances_keep_short_edges_below_long_ones() -> None:
    chain = Tree.chain(3, spacing=[1e17, 1])
    assert chain.distance_matrix()[1, 2] == 1.0  # was 0: (1e17 + 1) + 1e17 - 2 * 1e17
    assert chain.distance_matrix()[2, 1] == 1.0 and chain.distance_matrix()[0, 2] == 1e17 + 1
    tree = Tree.from_parents([-1, 0, 1, 1], weights=[0, 1e9, 1e-8, 1e-8])
    np.testing.assert_array_equal(tree.distance_matrix(), [[0, 2e-8], [2e-8, 0]])  # was all 0
    np.testing.assert_array_equal(tree.lca_depth(hops=False), [[1e9 + 1e-8, 1e9], [1e9, 1e9 + 1e-8]])
    np.testing.assert_array_equal(tree.lca_depth(hops=True), [[2, 1], [1, 2]])


@pytest.mark.parametrize("seed", range(6))
def test_distance_matrix_is_the_exact_path_sum_on_extreme_spacings(seed: int) -> None:
    """Edge lengths spread over 29 orders of magnitude (and some 0): every distance is within ``hops`` roundings
    of the exact sum of the edge lengths along the path; the LCA depths are those of the LCA node."""
    rng = np.random.default_rng(seed)
    base = random_tree(
        rng, int(rng.integers(2, 45)), shape=("recursive", "deep", "bushy")[seed % 3], internal_classes=bool(seed % 2)
    )
    weights = 10.0 ** rng.uniform(-12, 17, base.num_nodes)
    weights[rng.random(base.num_nodes) < 0.1] = 0.0
    tree = Tree.from_parents(base.parents, weights=weights, classes=base.classes)
    d = tree.distance_matrix()
    exact, hops, lca = _exact_pairs(tree)
    for a in range(tree.num_classes):
        for b in range(tree.num_classes):
            error = abs(Fraction(float(d[a, b])) - exact[a][b])
            assert error <= hops[a][b] * Fraction(2) ** -53 * exact[a][b], (a, b, float(d[a, b]), float(exact[a][b]))
    assert np.array_equal(d, d.T)
    lca_nodes = np.asarray(lca)
    np.testing.assert_array_equal(tree.lca_depth(hops=True), tree.depth(hops=True)[lca_nodes])
    np.testing.assert_array_equal(tree.lca_depth(hops=False), tree.depth()[lca_nodes])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_losses_see_short_edges_below_long_ones(dtype: str, backend: str) -> None:
    """The fused backend's hard-target rho = 1 kernel reads the distance matrix (in the input's dtype): a confident
    wrong prediction costs the path between the classes, as on the reference backend."""
    import torch

    from emdloss import EMDLoss

    dt = getattr(torch, dtype)
    rtol = 1e-6 if dtype == "float32" else 1e-12
    for tree, pred, label, expected in [
        (Tree.chain(3, spacing=[1e17, 1]), 1, 2, 1.0),
        (Tree.from_parents([-1, 0, 1, 1], weights=[0, 1e9, 1e-8, 1e-8]), 0, 1, 2e-8),
    ]:
        logits = torch.full((1, tree.num_classes), -1e4, dtype=dt)
        logits[0, pred] = 1e4
        loss = EMDLoss(tree, backend=backend)(logits, torch.tensor([label]))
        assert loss.dtype == dt and float(loss) == pytest.approx(expected, rel=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_tables_are_permuted_to_class_order_correctly(dtype: type) -> None:
    """Tables of over a thousand classes in random output order go through the in-place permutation in several
    row blocks: sampled pairs against ancestor walks, and the LCA table against the LCA nodes' depths."""
    from emdloss._class_pairs import class_pairs

    rng = np.random.default_rng(5)
    tree = random_tree(rng, 3000, internal_classes=True)
    block_rows = (1 << 22) // (tree.num_classes * np.dtype(dtype).itemsize)  # _permute_in_place's 4 MiB blocks
    assert tree.num_classes > 2 * block_rows
    d = class_pairs(tree, dtype=dtype)
    lca = tree.lca_depth(hops=True)
    parents, weights, depth = tree.parents.tolist(), tree.weights.tolist(), tree.depth(hops=True)
    for a, b in rng.integers(0, tree.num_classes, size=(300, 2)).tolist():
        up_a, node = {}, int(tree.classes[a])
        length = 0.0
        while node >= 0:  # ancestors of a with their distance to a
            up_a[node] = length
            length, node = length + weights[node], parents[node]
        node, length = int(tree.classes[b]), 0.0
        while node not in up_a:
            length, node = length + weights[node], parents[node]
        assert d[a, b] == pytest.approx(up_a[node] + length, rel=1e-6 if dtype == np.float32 else 1e-12)
        assert lca[a, b] == depth[node]


def test_distance_matrix_writes_each_pair_once_whatever_the_depth(monkeypatch) -> None:
    """O(C^2) whatever the depth: the table is written in blocks, each pair of distinct classes once, so at most C^2
    entries in all (painting each class's ancestors, O(C^2 * depth), took 4.4 s for a 2,048-class chain).
    Counted, not timed."""
    from emdloss import _class_pairs

    written = []

    class CountingNumpy:
        def __getattr__(self, name: str) -> object:
            return getattr(np, name)

        def add(self, *args: object, **kwargs: object) -> object:
            written.append(kwargs["out"].size)  # type: ignore[union-attr]
            return np.add(*args, **kwargs)

    monkeypatch.setattr(_class_pairs, "np", CountingNumpy())
    for tree in (Tree.chain(2048), random_tree(np.random.default_rng(0), 4000, shape="deep")):
        written.clear()
        d = _class_pairs.class_pairs(tree)
        c = tree.num_classes
        assert c * (c - 1) <= sum(written) <= c * c  # runs of sibling classes also write their diagonal
        np.testing.assert_array_equal(d, d.T)
    assert d.shape == (c, c) and Tree.chain(2048).distance_matrix()[0, -1] == 2047


@pytest.mark.parametrize(
    "key, message",
    [
        (("x", "c"), r"weights has a key that is not an edge: \('x', 'c'\); keys are \(parent, child\)"),
        (("c", "a"), r"weights has a key that is not an edge: \('c', 'a'\), reversed: use \('a', 'c'\)"),
        ("b", r"weights has a key that is not an edge: 'b'"),
    ],
)
def test_from_edges_rejects_weight_keys_that_are_not_edges(key, message) -> None:
    with pytest.raises(TreeError, match=message):
        Tree.from_edges([("a", "b"), ("a", "c")], ["b", "c"], weights={("a", "b"): 2.0, key: 5.0})
    tree = Tree.from_edges([("a", "b"), ("a", "c")], ["b", "c"], weights={("a", "c"): 5.0})
    np.testing.assert_array_equal(tree.weights, [0.0, 1.0, 5.0])  # a missing edge still gets 1


def test_names_with_lone_surrogates_are_rejected_at_construction(tmp_path) -> None:
    """A name that is not valid Unicode text could be built but not saved (UTF-8 cannot encode it)."""
    message = r"names\[1\] = 'x\\ud800' \(node 1\) is not valid Unicode text: it holds a lone surrogate"
    with pytest.raises(TreeError, match=message):
        Tree.from_parents([-1, 0], names=["a", "x\ud800"])
    with pytest.raises(TreeError, match=r"names\[2\] = '\\udfff' \(node 2\)"):
        Tree.from_edges([("a", "b"), ("a", "\udfff")], ["b", "\udfff"])
    path = tmp_path / "tree.json"
    path.write_text('{"parents": [-1, 0], "classes": [1], "names": ["a", "\\ud800"]}')
    with pytest.raises(TreeError, match=r"names\[1\]"):
        Tree.load(path)
    ok = Tree.from_parents([-1, 0], names=["a", "\U0001f600"])  # a proper surrogate pair in UTF-16 terms
    ok.save(path)
    assert Tree.load(path) == ok
