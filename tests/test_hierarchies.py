"""Hierarchy builders against independent references: the raw WordNet edge list (networkx longest paths),
scipy's cophenetic distances, hand-written Newick cases and a round trip through a separate writer."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import random_tree, shared_data_or_skip

from emdloss import Tree, TreeError
from emdloss import hierarchies as H
from emdloss_lab.data import imagenet_wordnet_tree

nx = pytest.importorskip("networkx")


# ---------------------------------------------------------------------- DAG policy


def _dag():
    # r -> a -> b -> x ; r -> x (x has parents b (deep) and r (shallow)); r -> y ; a -> y (y: a deeper than r)
    return [("r", "a"), ("a", "b"), ("r", "x"), ("b", "x"), ("r", "y"), ("a", "y")]


@pytest.mark.parametrize(
    "policy, x_parent, y_parent", [("deepest", "b", "a"), ("shallowest", "r", "r"), ("first", "r", "r")]
)
def test_multi_parent_policies(policy, x_parent, y_parent):
    tree, rep = H.dag_to_tree(_dag(), ["x", "y"], multi_parent=policy)
    name = tree.names
    par = {name[v]: name[p] for v, p in enumerate(tree.parents.tolist()) if p >= 0}
    assert par["x"] == x_parent and par["y"] == y_parent
    assert rep.num_multi_parent == 2
    assert rep.resolved["x"][0] == x_parent


def test_ties_go_to_first_listed_parent_and_several_tops_get_a_root():
    edges = [("p2", "c"), ("p1", "c"), ("q", "d")]
    tree, rep = H.dag_to_tree(edges, ["c", "d"])
    par = {tree.names[v]: tree.names[p] for v, p in enumerate(tree.parents.tolist()) if p >= 0}
    assert par["c"] == "p2"
    assert rep.synthetic_root == "<root>" and tree.names[tree.root] == "<root>"
    with pytest.raises(TreeError, match="cycle"):
        H.dag_to_tree([("a", "b"), ("b", "a"), ("a", "c")], ["c"])
    with pytest.raises(TreeError, match="unknown class"):
        H.dag_to_tree(edges, ["zz"])
    with pytest.raises(ValueError, match="multi_parent"):
        H.dag_to_tree(edges, ["c"], multi_parent="random")


@pytest.mark.parametrize("seed", range(5))
def test_prune_keeps_class_distances(seed):
    rng = np.random.default_rng(seed)
    # a random tree with long unary chains inserted above random nodes
    base = random_tree(rng, 30, internal_classes=True)
    edges, w = [], {}
    for v, p in enumerate(base.parents.tolist()):
        if p < 0:
            continue
        prev = f"n{p}"
        for k in range(int(rng.integers(0, 3))):
            mid = f"m{v}_{k}"
            edges.append((prev, mid))
            w[(prev, mid)] = float(rng.uniform(0.1, 2))
            prev = mid
        edges.append((prev, f"n{v}"))
        w[(prev, f"n{v}")] = float(rng.uniform(0.1, 2))
    classes = [f"n{c}" for c in base.classes.tolist()]
    full = H.dag_to_tree(edges, classes, weights=w)[0]
    pruned, rep = H.dag_to_tree(edges, classes, weights=w, prune=True)
    np.testing.assert_allclose(pruned.distance_matrix(), full.distance_matrix(), rtol=1e-12, atol=1e-12)
    is_class = np.zeros(pruned.num_nodes, bool)
    is_class[pruned.classes] = True
    nchild = np.bincount(pruned.parents[pruned.parents >= 0], minlength=pruned.num_nodes)
    assert not np.any((nchild == 1) & ~is_class)
    assert rep.num_pruned == full.num_nodes - pruned.num_nodes > 0


def test_prune_removes_a_unary_root_chain():
    tree, rep = H.dag_to_tree([("r", "a"), ("a", "b"), ("b", "x"), ("b", "y")], ["x", "y"], prune=True)
    assert tree.names[tree.root] == "b" and tree.num_nodes == 3 and rep.num_pruned == 2
    single, _ = H.dag_to_tree([("r", "a"), ("a", "x")], ["x"], prune=True)
    assert single.names == ("x",)


# ---------------------------------------------------------------------- WordNet


@pytest.fixture(scope="module")
def wordnet_edges():
    root = shared_data_or_skip()
    edges = H.read_isa(root / "hierarchies/imagenet-wordnet/is_a.txt")
    classes = (root / "hierarchies/timm/imagenet_synsets.txt").read_text().split()
    return edges, classes


def test_imagenet_wordnet_tree(wordnet_edges):
    edges, classes = wordnet_edges
    tree, rep = imagenet_wordnet_tree(return_report=True)
    assert tree.num_classes == 1000
    assert [tree.names[c] for c in tree.classes.tolist()] == classes  # standard class-index order
    assert tree.names[tree.root] == "n00001740"  # entity: one root
    assert rep.num_closure_nodes == tree.num_nodes == 1860
    assert rep.num_multi_parent == 75

    # every tree edge is a WordNet edge; every class reaches the root through WordNet edges
    edge_set = set(edges)
    names = tree.names
    for v, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            assert (names[p], names[v]) in edge_set
    # independent reference: the ancestor closure and longest-path depths from networkx
    g = nx.DiGraph(edges)
    closure = set(classes).union(*(nx.ancestors(g, c) for c in classes))
    assert set(names) == closure
    sub = g.subgraph(closure)
    depth = {}
    for v in nx.topological_sort(sub):
        depth[v] = max((depth[p] + 1 for p in sub.predecessors(v)), default=0)
    multi = [v for v in closure if sub.in_degree(v) > 1]
    assert len(multi) == 75 and set(rep.resolved) == set(multi)
    for v in multi:
        kept, dropped = rep.resolved[v]
        assert all(depth[kept] >= depth[d] for d in dropped)  # the "deepest" policy
    # every class is reachable from the root
    parents = tree.parents
    for c in tree.classes.tolist():
        v, steps = c, 0
        while parents[v] >= 0:
            v, steps = int(parents[v]), steps + 1
        assert v == tree.root and steps >= 1


def test_imagenet_wordnet_pruned(wordnet_edges):
    full = imagenet_wordnet_tree()
    pruned, rep = imagenet_wordnet_tree(prune=True, return_report=True)
    assert pruned.num_nodes < full.num_nodes and rep.num_pruned == full.num_nodes - pruned.num_nodes
    np.testing.assert_array_equal(pruned.distance_matrix(), full.distance_matrix())


def test_networkx_matches_isa_file(wordnet_edges):
    edges, classes = wordnet_edges
    g = nx.DiGraph()
    g.add_edges_from(edges)
    from_file = imagenet_wordnet_tree(multi_parent="deepest")
    from_graph = H.from_networkx(g, classes, multi_parent="deepest")
    pf = {from_file.names[v]: from_file.names[p] for v, p in enumerate(from_file.parents.tolist()) if p >= 0}
    pg = {from_graph.names[v]: from_graph.names[p] for v, p in enumerate(from_graph.parents.tolist()) if p >= 0}
    assert pf.keys() == pg.keys()
    # networkx lists edges grouped by parent, not in file order, so only ties may resolve differently
    closure = set(pf) | {from_file.names[from_file.root]}
    sub = g.subgraph(closure)
    depth = {}
    for v in nx.topological_sort(sub):
        depth[v] = max((depth[p] + 1 for p in sub.predecessors(v)), default=0)
    differ = [v for v in pf if pf[v] != pg[v]]
    assert all(sub.in_degree(v) > 1 and depth[pf[v]] == depth[pg[v]] for v in differ)
    assert len(differ) < 20


class _FakeSynset:
    def __init__(self, wn, wnid):
        self.wn, self.wnid = wn, wnid

    def pos(self):
        return self.wnid[0]

    def offset(self):
        return int(self.wnid[1:])

    def name(self):
        return f"syn{self.wnid}.n.01"

    def hypernyms(self):
        return [_FakeSynset(self.wn, p) for p in self.wn.parents.get(self.wnid, [])]

    def instance_hypernyms(self):
        return []


class _FakeWordNet:
    """The nltk reader interface the builder uses, backed by the is-a file (for machines without the corpus)."""

    def __init__(self, edges):
        self.parents = {}
        for p, c in edges:
            self.parents.setdefault(c, []).append(p)

    def synset_from_pos_and_offset(self, pos, offset):
        return _FakeSynset(self, f"{pos}{offset:08d}")


def test_nltk_builder_logic_with_a_stand_in_reader(wordnet_edges):
    edges, classes = wordnet_edges
    tree = H.from_nltk(classes, wordnet=_FakeWordNet(edges))
    assert tree == imagenet_wordnet_tree()


def test_nltk_wordnet_corpus_when_installed(wordnet_edges):
    nltk = pytest.importorskip("nltk", reason="nltk is not installed (optional extra emdloss[nltk])")
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        pytest.skip("nltk's WordNet corpus is not installed (never downloaded by the tests)")
    del nltk
    _, classes = wordnet_edges
    tree, rep = H.from_nltk(classes, return_report=True)
    assert tree.num_classes == 1000 and rep.num_closure_nodes == 1860 and rep.num_multi_parent == 75
    assert tree == imagenet_wordnet_tree()


def test_networkx_weights_and_errors():
    g = nx.DiGraph()
    g.add_edge("root", "a", length=2.0)
    g.add_edge("root", "b", length=0.5)
    g.add_edge("a", "c", length=1.0)
    tree = H.from_networkx(g, weight="length")
    assert [tree.names[c] for c in tree.classes.tolist()] == ["b", "c"]
    assert tree.distance_matrix()[0, 1] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="directed"):
        H.from_networkx(nx.Graph([(1, 2)]))
    with pytest.raises(ValueError, match="no attribute 'w'"):
        H.from_networkx(g, weight="w")


# ---------------------------------------------------------------------- Newick


def test_newick_by_hand():
    text = """[a comment] ((cat:1,dog:1.0e0)Carnivora:2,
             (cow:1.5,'sperm whale':2, 'it''s')Cetartiodactyla[&&NHX:x=1]:1)Mammalia;"""
    tree = H.from_newick(text)
    names = [tree.names[c] for c in tree.classes.tolist()]
    assert names == ["cat", "dog", "cow", "sperm whale", "it's"]
    d = tree.distance_matrix()
    assert d[0, 1] == 2 and d[0, 2] == pytest.approx(1 + 2 + 1 + 1.5) and d[3, 4] == pytest.approx(3)
    # internal classes and a class order
    t2 = H.from_newick(text, classes=["Carnivora", "cow"])
    assert t2.distance_matrix()[0, 1] == pytest.approx(2 + 1 + 1.5)


def test_newick_support_values_and_unlabelled_nodes():
    text = "((a,b)95,(c,d)95,e);"
    with pytest.raises(TreeError, match="internal_labels='ignore'"):
        H.from_newick(text)
    tree = H.from_newick(text, internal_labels="ignore", default_length=0.5)
    assert tree.num_nodes == 8 and tree.distance_matrix()[0, 2] == pytest.approx(2.0)
    assert H.from_newick("(a_b,c);", underscores_to_spaces=True).names[1] == "a b"


@pytest.mark.parametrize(
    "text, match",
    [
        ("(a,b)", "end with ';'"),
        ("(a,b));", "unmatched"),
        ("((a,b);", "unclosed"),
        ("(a,b):x;", "bad branch length"),
        ("(a:-1,b);", ">= 0"),
        ("(a,b); (c,d);", "one tree per string"),
        ("(a,'b);", "unterminated quoted"),
        ("(a,b)[c;", "unterminated"),
        ("(a b,c);", "unexpected label"),
        ("(a,a);", "duplicate"),
    ],
)
def test_newick_errors(text, match):
    with pytest.raises(TreeError, match=match):
        H.from_newick(text)


def _to_newick(tree: Tree) -> str:
    """An independent iterative writer (post-order with an explicit stack), quoting every label."""
    kids: dict[int, list[int]] = {}
    for v, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            kids.setdefault(p, []).append(v)
    out: dict[int, str] = {}
    stack = [(tree.root, False)]
    while stack:
        v, ready = stack.pop()
        if not ready and v in kids:
            stack.append((v, True))
            stack.extend((c, False) for c in kids[v])
            continue
        inner = "(" + ",".join(out.pop(c) for c in kids[v]) + ")" if v in kids else ""
        label = "'" + tree.names[v].replace("'", "''") + "'"
        out[v] = f"{inner}{label}:{float(tree.weights[v])!r}"
    return out[tree.root] + ";"


@pytest.mark.parametrize("seed", range(4))
def test_newick_round_trip_random_trees(seed):
    rng = np.random.default_rng(seed)
    base = random_tree(rng, 40, internal_classes=True)
    named = Tree.from_parents(
        base.parents, base.weights, names=[f"n'{i} x" for i in range(base.num_nodes)], classes=base.classes
    )
    back = H.from_newick(_to_newick(named), classes=[named.names[c] for c in named.classes.tolist()])
    np.testing.assert_allclose(back.distance_matrix(), named.distance_matrix(), rtol=1e-12)


def test_newick_deep_chain_no_recursion_limit():
    depth = 100_000
    text = "(" * depth + "leaf" + "".join(f",x{i})" for i in range(depth)) + ";"
    tree = H.from_newick(text)
    assert tree.num_classes == depth + 1
    assert tree.depth()[tree.classes[0]] == depth


# ---------------------------------------------------------------------- clustering


def test_ultrametric_is_recovered_exactly():
    # a tree metric that is ultrametric (all classes at one depth) is reproduced with zero distortion
    t = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2, 2], weights=[0, 2, 2, 1, 1, 1, 1, 1])
    d = t.distance_matrix()
    tree, rep = H.from_distance_matrix(d, method="average", return_report=True)
    np.testing.assert_allclose(tree.distance_matrix(), d)
    assert rep.mean_relative_distortion == pytest.approx(0, abs=1e-12) and rep.pearson == pytest.approx(1)
    assert tree.num_nodes == t.num_nodes  # ties collapsed into the 3-way merge


@pytest.mark.parametrize("method", ["average", "complete", "single", "weighted"])
def test_tree_distance_is_scipy_cophenetic(method):
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    d = squareform(pdist(x))
    tree, rep = H.from_distance_matrix(d, method=method, return_report=True)
    coph = squareform(cophenet(linkage(pdist(x), method=method)))
    np.testing.assert_allclose(tree.distance_matrix(), coph, rtol=1e-10, atol=1e-12)
    iu = np.triu_indices(40, 1)
    assert rep.pearson == pytest.approx(np.corrcoef(coph[iu], d[iu])[0, 1])
    assert rep.mean_relative_distortion == pytest.approx(np.mean(np.abs(coph[iu] - d[iu]) / d[iu]))
    assert tree.num_classes == 40 and rep.num_pairs == 780


def test_embeddings_and_bad_matrices():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 0.1, (5, 3)), rng.normal(5, 0.1, (5, 3))])
    tree, rep = H.from_embeddings(x, names=[f"c{i}" for i in range(10)], method="ward", return_report=True)
    d = tree.distance_matrix()
    assert d[:5, :5].max() < d[:5, 5:].min()  # the two clusters split at the root
    assert rep.spearman > 0.5
    with pytest.raises(ValueError, match="symmetric"):
        H.from_distance_matrix(np.array([[0, 1.0], [2.0, 0]]))
    with pytest.raises(ValueError, match="square"):
        H.from_distance_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="method"):
        H.from_distance_matrix(np.array([[0, 1.0], [1.0, 0]]), method="centroid")
