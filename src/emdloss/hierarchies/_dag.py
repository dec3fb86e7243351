"""Turn a DAG of named nodes (``parent -> child`` edges) into a :class:`~emdloss.Tree` over given classes.

Shared by every builder whose source may not be a tree (WordNet files, nltk, networkx graphs). Steps:

1. Restrict to the ancestor closure of the classes (the classes and everything above them).
2. Resolve nodes with several parents by one deterministic policy (:data:`POLICIES`):

   - ``"deepest"`` (default): keep the parent with the longest path from the root (the most specific
     hypernym; for WordNet this keeps e.g. ``dog -> canine`` over ``dog -> domestic animal``);
   - ``"shallowest"``: keep the parent with the shortest longest-path depth (the most general one);
   - ``"first"``: keep the parent listed first in the input.

   Ties under "deepest"/"shallowest" go to the parent listed first, so the result depends only on the
   input. Depths are longest-path depths in the closure computed before any choice is made.
3. Several top nodes get a synthetic common root (``root_name``, unit edges).
4. Optionally prune: contract every non-class internal node with exactly one child (its child hangs from
   its parent with the two edge lengths added, so every distance between classes is unchanged), and drop
   a non-class root with one child.

The :class:`DagReport` says what was done (how many nodes had several parents, which parent was kept).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..tree import Tree, TreeError

POLICIES = ("deepest", "shallowest", "first")


@dataclass
class DagReport:
    """What :func:`dag_to_tree` did.

    Attributes:
        num_closure_nodes: nodes in the ancestor closure of the classes (before pruning).
        num_multi_parent: nodes of the closure that had several parents and were resolved by the policy.
        resolved: for each such node, ``(kept_parent, [dropped parents])``.
        num_pruned: single-child internal nodes contracted (``prune=True``).
        num_nodes: nodes of the final tree.
        synthetic_root: the name of the added root, or None if the closure had one top node.
        policy: the multi-parent policy used.
    """

    num_closure_nodes: int = 0
    num_multi_parent: int = 0
    resolved: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    num_pruned: int = 0
    num_nodes: int = 0
    synthetic_root: str | None = None
    policy: str = "deepest"

    def summary(self) -> str:
        return (
            f"{self.num_closure_nodes} nodes above the classes, {self.num_multi_parent} with several parents "
            f"resolved by policy {self.policy!r}, {self.num_pruned} single-child nodes pruned -> "
            f"{self.num_nodes} nodes"
        )


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"multi_parent must be one of {POLICIES}, got {policy!r}")


def dag_to_tree(
    edges: Iterable[tuple[Hashable, Hashable]],
    classes: Sequence[Hashable],
    *,
    weights: Mapping[tuple[Hashable, Hashable], float] | None = None,
    multi_parent: str = "deepest",
    prune: bool = False,
    root_name: str = "<root>",
) -> tuple[Tree, DagReport]:
    """Build a tree over ``classes`` (output order kept) from DAG ``edges`` (parent, child); see module doc.

    Node names in the tree are ``str(node)``; they must be unique. ``weights`` maps an edge to its length
    (default 1). Raises :class:`~emdloss.TreeError` for unknown classes, cycles or duplicate names.
    """
    check_policy(multi_parent)
    if isinstance(classes, (str, bytes)):
        raise TypeError("classes must be a sequence of node names, not a single string")
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty: give the node names of the model's outputs")
    if len(set(classes)) != len(classes):
        dup = next(c for i, c in enumerate(classes) if c in classes[:i])
        raise ValueError(f"classes contains {dup!r} more than once")

    parents_of: dict[Hashable, list[Hashable]] = {}
    known: set[Hashable] = set()
    for k, edge in enumerate(edges):
        try:
            p, c = edge
        except (TypeError, ValueError):
            raise TreeError(f"edges[{k}] must be a (parent, child) pair, got {edge!r}") from None
        if p == c:
            raise TreeError(f"cycle: edge {k} makes {p!r} its own parent")
        known.add(p)
        known.add(c)
        lst = parents_of.setdefault(c, [])
        if p not in lst:
            lst.append(p)
    for k, c in enumerate(classes):
        if c not in known and not (len(classes) == 1 and not known):
            raise TreeError(f"unknown class: classes[{k}] = {c!r} is not a node of the graph")

    # 1. ancestor closure, in discovery order
    closure: list[Hashable] = []
    seen: set[Hashable] = set()
    stack = list(reversed(classes))
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        closure.append(v)
        stack.extend(p for p in reversed(parents_of.get(v, [])) if p not in seen)

    # 2. longest-path depth from the top by Kahn's algorithm on the closure (also detects cycles)
    children_of: dict[Hashable, list[Hashable]] = {v: [] for v in closure}
    indeg = {v: 0 for v in closure}
    for v in closure:
        for p in parents_of.get(v, []):
            children_of[p].append(v)
            indeg[v] += 1
    depth = {v: 0 for v in closure}
    queue = [v for v in closure if indeg[v] == 0]
    tops = list(queue)
    done = 0
    while queue:
        v = queue.pop()
        done += 1
        for c in children_of[v]:
            depth[c] = max(depth[c], depth[v] + 1)
            indeg[c] -= 1
            if indeg[c] == 0:
                queue.append(c)
    if done != len(closure):
        stuck = next(v for v in closure if indeg[v] > 0)
        raise TreeError(f"the graph has a cycle through {stuck!r}; a hierarchy must be acyclic")

    report = DagReport(num_closure_nodes=len(closure), policy=multi_parent)
    parent: dict[Hashable, Hashable | None] = {}
    for v in closure:
        ps = parents_of.get(v, [])
        if not ps:
            parent[v] = None
            continue
        if len(ps) == 1 or multi_parent == "first":
            keep = ps[0]
        elif multi_parent == "deepest":
            keep = max(ps, key=lambda p: depth[p])  # max/min return the first of equals: input order
        else:
            keep = min(ps, key=lambda p: depth[p])
        parent[v] = keep
        if len(ps) > 1:
            report.resolved[str(v)] = (str(keep), [str(p) for p in ps if p != keep])
    report.num_multi_parent = len(report.resolved)

    # 3. one root
    names = [str(v) for v in closure]
    if len(set(names)) != len(names):
        seen_n: set[str] = set()
        dup = next(n for n in names if n in seen_n or seen_n.add(n))  # type: ignore[func-returns-value]
        raise TreeError(f"two nodes share the name {dup!r}; node names must be unique as strings")
    index = {v: i for i, v in enumerate(closure)}
    n = len(closure)
    par = np.array([index[parent[v]] if parent[v] is not None else -1 for v in closure], dtype=np.int64)
    w = np.ones(n, dtype=np.float64)
    if weights is not None:
        for v in closure:
            if parent[v] is not None:
                w[index[v]] = float(weights.get((parent[v], v), 1.0))
    if len(tops) > 1:
        if root_name in names:
            raise TreeError(f"the synthetic root name {root_name!r} is already a node; pass another root_name")
        par = np.where(par == -1, n, par)
        par = np.append(par, -1)
        w = np.append(w, 0.0)
        names.append(root_name)
        report.synthetic_root = root_name
    class_ids = np.array([index[c] for c in classes], dtype=np.int64)

    # 4. prune
    if prune:
        par, w, names, class_ids, report.num_pruned = contract_unary(par, w, names, class_ids)
    tree = Tree.from_parents(par, weights=w, names=names, classes=class_ids)
    report.num_nodes = tree.num_nodes
    return tree, report


def contract_unary(
    parents: np.ndarray, weights: np.ndarray, names: list[str], classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, int]:
    """Remove every non-class node with exactly one child (adding edge lengths) and a non-class root with
    one child. Returns new ``(parents, weights, names, classes, num_removed)``; node order is kept."""
    n = parents.size
    is_class = np.zeros(n, dtype=bool)
    is_class[classes] = True
    nchild = np.bincount(parents[parents >= 0], minlength=n)
    par = parents.copy()
    w = weights.astype(np.float64).copy()
    remove = (~is_class) & (nchild == 1)
    # Re-hang each node from its first kept ancestor, summing lengths; iterative, any depth.
    for v in range(n):
        p = par[v]
        while p >= 0 and remove[p] and par[p] >= 0:
            w[v] += w[p]
            p = par[p]
        par[v] = p
    # a removable root: its only child becomes the root
    root = int(np.flatnonzero(parents == -1)[0])
    if remove[root]:
        (child,) = np.flatnonzero((par == root) & ~remove)  # the first kept node below the root
        par[child] = -1
        w[child] = 0.0
    keep = ~remove
    new_id = np.cumsum(keep) - 1
    new_par = np.where(par[keep] >= 0, new_id[np.maximum(par[keep], 0)], -1)
    new_names = [nm for nm, k in zip(names, keep.tolist()) if k]
    return new_par, w[keep], new_names, new_id[classes], int(remove.sum())
