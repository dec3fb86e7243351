"""Hierarchies from a networkx ``DiGraph`` whose edges point from parent to child."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal, overload

from ..tree import Tree
from ._dag import DagReport, dag_to_tree

__all__ = ["from_networkx"]


# The overloads tell a type checker that the result is a (tree, report) pair exactly when return_report=True.
@overload
def from_networkx(
    graph: Any,
    classes: Sequence[Hashable] | None = None,
    *,
    weight: str | None = None,
    multi_parent: str = "deepest",
    prune: bool = False,
    root_name: str = "<root>",
    return_report: Literal[False] = False,
) -> Tree: ...


@overload
def from_networkx(
    graph: Any,
    classes: Sequence[Hashable] | None = None,
    *,
    weight: str | None = None,
    multi_parent: str = "deepest",
    prune: bool = False,
    root_name: str = "<root>",
    return_report: Literal[True],
) -> tuple[Tree, DagReport]: ...


@overload
def from_networkx(
    graph: Any,
    classes: Sequence[Hashable] | None = None,
    *,
    weight: str | None = None,
    multi_parent: str = "deepest",
    prune: bool = False,
    root_name: str = "<root>",
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]: ...


def from_networkx(
    graph: Any,
    classes: Sequence[Hashable] | None = None,
    *,
    weight: str | None = None,
    multi_parent: str = "deepest",
    prune: bool = False,
    root_name: str = "<root>",
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]:
    """Tree from a ``networkx.DiGraph`` (edges parent -> child).

    Args:
        graph: a directed acyclic graph; a tree passes through unchanged, a DAG is resolved by
            ``multi_parent`` ("deepest" | "shallowest" | "first", see :mod:`emdloss.hierarchies._dag`;
            "first" means the first in-edge in the graph's edge order).
        classes: the nodes that are the model's outputs, in output order (default: the nodes without
            children, in the graph's node order). Only their ancestor closure is kept.
        weight: edge attribute holding the edge length (default: every edge has length 1).
        prune: contract single-child non-class nodes (class distances unchanged).
        root_name: name of the root added when the graph has several top nodes.
        return_report: also return the :class:`DagReport`.

    Node names of the tree are ``str(node)``.
    """
    if not (hasattr(graph, "is_directed") and hasattr(graph, "edges")):
        raise TypeError(f"graph must be a networkx DiGraph, got {type(graph).__name__}")
    if not graph.is_directed():
        raise ValueError("graph must be directed (edges parent -> child); got an undirected graph")
    if classes is None:
        classes = [v for v in graph.nodes if graph.out_degree(v) == 0]
    edges = list(graph.edges(data=True))
    lengths = None
    if weight is not None:
        lengths = {}
        for p, c, data in edges:
            if weight not in data:
                raise ValueError(f"edge ({p!r}, {c!r}) has no attribute {weight!r}")
            lengths[(p, c)] = float(data[weight])
    pairs = [(p, c) for p, c, _ in edges]
    if len(graph) == 1 and not pairs:
        (only,) = list(graph.nodes)
        pairs, classes = [], [only]
    result = dag_to_tree(pairs, classes, weights=lengths, multi_parent=multi_parent, prune=prune, root_name=root_name)
    return result if return_report else result[0]
