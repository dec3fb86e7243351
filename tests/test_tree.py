"""Tree construction, validation, DFS structure, distances and JSON round-trips."""

from __future__ import annotations

import json
import pickle
from collections import deque

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
        ('[1, 2]', "JSON object"),
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
