"""`Tree`: an immutable, validated class hierarchy with weighted edges.

A tree has ``num_nodes`` nodes with integer ids ``0 .. num_nodes - 1``. ``parents[i]`` is the parent of
node ``i`` (``-1`` for the single root) and ``weights[i] >= 0`` is the length of the edge from ``i`` to its
parent (``weights[root]`` is stored as 0 and never used). ``classes[k]`` is the node that output ``k`` of a
model stands for; classes may be leaves or internal nodes.

For the O(nodes) algorithms the tree also keeps its depth-first pre-order: ``preorder[k]`` is the node at
DFS position ``k``, and the subtree of the node at position ``k`` is exactly positions
``[k, subtree_end[k])``. The edge above the node at position ``k > 0`` therefore separates the mass at
positions ``[k, subtree_end[k])`` from the rest. See docs/algorithm.md.

This module knows nothing of torch: everything here is numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ._atomic import write_text
from ._class_pairs import class_pairs

__all__ = ["Tree", "TreeError"]

_FORMAT = "emdloss.Tree"
_VERSION = 1
_DICT_KEYS = {"format", "version", "parents", "weights", "names", "classes"}

T = TypeVar("T")
_MISSING = object()


class TreeError(ValueError):
    """A hierarchy that is not a valid tree (cycle, several roots, bad weight, unknown class ...)."""


def _as_int_array(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except Exception as exc:  # ragged lists and the like
        raise TreeError(f"{what} must be a 1-D sequence of integers: {exc}") from None
    if arr.ndim != 1:
        raise TreeError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TreeError(f"{what} must contain integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
        raise TreeError(f"{what} must contain integers, got non-integral values")
    return arr.astype(np.int64)


class Tree:
    """An immutable rooted tree over ``num_nodes`` nodes whose ``classes`` are the model's outputs.

    Build one with :meth:`from_parents`, :meth:`from_edges`, :meth:`chain` or :meth:`load`. All arrays
    exposed by the tree are read-only numpy views.

    Attributes:
        parents: (num_nodes,) int64, ``-1`` at the root.
        weights: (num_nodes,) float64 edge lengths to the parent (0 at the root).
        classes: (num_classes,) int64 node id of each output, in output order.
        names: tuple of node names, or ``None``.
        root: the id of the root node.
        preorder: (num_nodes,) node id at each DFS pre-order position.
        position: (num_nodes,) DFS position of each node (inverse of ``preorder``).
        subtree_end: (num_nodes,) for DFS position ``k``, the end (exclusive) of its subtree's range.
        edge_nodes: (num_edges,) the child node of each edge, in increasing node id. Column ``j`` of
            :func:`emdloss.functional.flows` is the edge from ``edge_nodes[j]`` to its parent.
    """

    __slots__ = (
        "_depth",
        "_derived",
        "_hash",
        "_is_chain",
        "classes",
        "edge_nodes",
        "names",
        "parents",
        "position",
        "preorder",
        "root",
        "subtree_end",
        "weights",
    )

    # Class-level declarations of the slots, so that type checkers know them (annotations only: a value here would
    # clash with the slot). All arrays are read-only and set once, in __init__, via object.__setattr__.
    parents: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float64]
    classes: npt.NDArray[np.int64]
    names: tuple[str, ...] | None
    root: int
    preorder: npt.NDArray[np.int64]
    position: npt.NDArray[np.int64]
    subtree_end: npt.NDArray[np.int64]
    edge_nodes: npt.NDArray[np.int64]
    _depth: npt.NDArray[np.float64]
    _is_chain: bool
    _hash: int | None
    _derived: dict[Hashable, Any]

    def __init__(
        self,
        parents: Sequence[int] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        names: Sequence[str] | None = None,
        classes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        parents_arr = _as_int_array(parents, "parents")
        n = parents_arr.size
        if n == 0:
            raise TreeError("a tree needs at least one node; parents is empty")
        bad = np.flatnonzero((parents_arr < -1) | (parents_arr >= n))
        if bad.size:
            i = int(bad[0])
            raise TreeError(
                f"parents[{i}] = {int(parents_arr[i])} is out of range: "
                f"parents must be -1 (root) or a node id in [0, {n})"
            )
        self_loops = np.flatnonzero(parents_arr == np.arange(n))
        if self_loops.size:
            raise TreeError(f"cycle: node {int(self_loops[0])} is its own parent")
        roots = np.flatnonzero(parents_arr == -1)
        if roots.size == 0:
            raise TreeError("no root: exactly one node must have parent -1 (the hierarchy has a cycle or no top)")
        if roots.size > 1:
            shown = ", ".join(str(int(r)) for r in roots[:5])
            more = ", ..." if roots.size > 5 else ""
            raise TreeError(f"several roots: {roots.size} nodes have parent -1 ({shown}{more})")
        root = int(roots[0])

        if weights is None:
            weights_arr = np.ones(n, dtype=np.float64)
        else:
            try:
                weights_arr = np.asarray(weights, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise TreeError(f"weights must be a 1-D sequence of numbers: {exc}") from None
            if weights_arr.shape != (n,):
                raise TreeError(f"weights must have one entry per node ({n}), got shape {weights_arr.shape}")
            weights_arr = weights_arr.copy()
        weights_arr[root] = 0.0
        nonfinite = np.flatnonzero(~np.isfinite(weights_arr))
        if nonfinite.size:
            i = int(nonfinite[0])
            raise TreeError(f"weights must be finite: weights[{i}] = {weights_arr[i]}")
        negative = np.flatnonzero(weights_arr < 0)
        if negative.size:
            i = int(negative[0])
            raise TreeError(f"weights must be >= 0: weights[{i}] = {weights_arr[i]}")

        if names is not None:
            if isinstance(names, (str, bytes)):
                raise TreeError("names must be a sequence of strings, one per node, not a single string")
            names_t = tuple(names)
            if len(names_t) != n:
                raise TreeError(f"names must have one entry per node ({n}), got {len(names_t)}")
            for i, name in enumerate(names_t):
                if not isinstance(name, str):
                    raise TreeError(f"names[{i}] must be a str, got {type(name).__name__}")
            _check_encodable(names_t)
            if len(set(names_t)) != n:
                seen: set[str] = set()
                for name in names_t:
                    if name in seen:
                        raise TreeError(f"duplicate name: {name!r} names more than one node")
                    seen.add(name)
            names = names_t

        preorder, subtree_size = _dfs_preorder(parents_arr, root)
        if preorder.size != n:
            reached = np.zeros(n, dtype=bool)
            reached[preorder] = True
            lost = int(np.flatnonzero(~reached)[0])
            cycle = _find_cycle(parents_arr, lost)
            label = (lambda v: f"{v} ({names[v]!r})") if names is not None else str
            if cycle:
                raise TreeError("cycle in the hierarchy: " + " -> ".join(label(v) for v in cycle + cycle[:1]))
            raise TreeError(f"node {label(lost)} is not reachable from the root {label(root)}")  # pragma: no cover

        position = np.empty(n, dtype=np.int64)
        position[preorder] = np.arange(n, dtype=np.int64)
        subtree_end = np.arange(n, dtype=np.int64) + subtree_size[preorder]

        if classes is None:
            is_leaf = np.ones(n, dtype=bool)
            is_leaf[parents_arr[parents_arr >= 0]] = False
            classes_arr = np.flatnonzero(is_leaf).astype(np.int64)
        else:
            classes_arr = _as_int_array(classes, "classes")
            if classes_arr.size == 0:
                raise TreeError("classes is empty: a tree needs at least one class")
            bad = np.flatnonzero((classes_arr < 0) | (classes_arr >= n))
            if bad.size:
                k = int(bad[0])
                raise TreeError(f"classes[{k}] = {int(classes_arr[k])} is out of range: node ids are in [0, {n})")
            uniq, counts = np.unique(classes_arr, return_counts=True)
            if uniq.size != classes_arr.size:
                raise TreeError(f"classes are repeated: node {int(uniq[counts > 1][0])} appears more than once")

        depth = np.zeros(n, dtype=np.float64)  # weighted: depth[v] = depth[parent] + w[v], in pre-order (parent first)
        _fill_depth(depth, preorder, parents_arr[preorder[1:]], weights_arr[preorder[1:]])

        edge_nodes = np.flatnonzero(parents_arr >= 0).astype(np.int64)
        arrays = dict(
            parents=parents_arr,
            weights=weights_arr,
            classes=classes_arr,
            preorder=preorder,
            position=position,
            subtree_end=subtree_end,
            edge_nodes=edge_nodes,
            _depth=depth,
        )
        for name, arr in arrays.items():
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "root", root)
        is_chain = classes_arr.size == n and np.array_equal(classes_arr, preorder) and np.all(subtree_end == n)
        object.__setattr__(self, "_is_chain", bool(is_chain))
        object.__setattr__(self, "_hash", None)
        object.__setattr__(self, "_derived", {})  # see cached(); never part of equality

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Tree is immutable; cannot set {name!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(
        cls,
        parents: Sequence[int] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        names: Sequence[str] | None = None,
        classes: Sequence[int] | np.ndarray | None = None,
    ) -> Tree:
        """Build from a parent array: ``parents[i]`` is the parent of node ``i``, ``-1`` for the root.

        Args:
            parents: (num_nodes,) integers.
            weights: (num_nodes,) finite, non-negative length of the edge from ``i`` to its parent
                (default 1; the root's entry is ignored).
            names: optional unique string per node.
            classes: node ids of the model's outputs, in output order (default: the leaves in
                increasing node id). Internal nodes are allowed (coarse labels).
        """
        return cls(parents, weights=weights, names=names, classes=classes)

    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        classes: Sequence[str],
        weights: Sequence[float] | Mapping[tuple[str, str], float] | None = None,
    ) -> Tree:
        """Build from ``(parent_name, child_name)`` pairs; ``classes`` are names, in output order.

        ``weights`` is either a sequence aligned with ``edges`` or a mapping ``(parent, child) -> length``
        (missing edges get 1). Node ids are assigned in order of first appearance.
        """
        edge_list = [tuple(e) for e in edges]
        ids: dict[str, int] = {}
        for k, edge in enumerate(edge_list):
            if len(edge) != 2:
                raise TreeError(f"edges[{k}] must be a (parent, child) pair, got {edge!r}")
            for name in edge:
                if not isinstance(name, str):
                    raise TreeError(f"edges[{k}] has a non-string name {name!r}")
                if name not in ids:
                    ids[name] = len(ids)
        if isinstance(classes, str):
            raise TreeError("classes must be a sequence of node names, not a single string")
        class_list = list(classes)
        if not edge_list and len(class_list) == 1:
            ids[class_list[0]] = 0  # a single-node tree
        n = len(ids)
        parents = np.full(n, -1, dtype=np.int64)
        w = np.ones(n, dtype=np.float64)
        if isinstance(weights, Mapping):
            edge_set = set(edge_list)
            for key in weights:
                if key not in edge_set:
                    flipped = isinstance(key, tuple) and len(key) == 2 and (key[1], key[0]) in edge_set
                    fix = f", reversed: use {(key[1], key[0])!r}" if flipped else ""
                    raise TreeError(f"weights has a key that is not an edge: {key!r}{fix}; keys are (parent, child)")
        elif weights is not None:
            weights = list(weights)
            if len(weights) != len(edge_list):
                raise TreeError(f"weights must have one entry per edge ({len(edge_list)}), got {len(weights)}")
        for k, (parent, child) in enumerate(edge_list):
            c, p = ids[child], ids[parent]
            if parents[c] != -1:
                if parents[c] == p:
                    raise TreeError(f"duplicate edge: ({parent!r}, {child!r}) appears more than once")
                other = next(name for name, i in ids.items() if i == parents[c])
                raise TreeError(
                    f"node {child!r} has several parents ({other!r} and {parent!r}); a tree needs exactly one. "
                    "For DAGs such as WordNet use emdloss.hierarchies, which resolves them by a documented policy"
                )
            parents[c] = p
            if weights is not None:
                w[c] = weights.get((parent, child), 1.0) if isinstance(weights, Mapping) else weights[k]
        names = [""] * n
        for name, i in ids.items():
            names[i] = name
        class_ids = []
        for k, name in enumerate(class_list):
            if name not in ids:
                raise TreeError(f"unknown class name: classes[{k}] = {name!r} is not a node of the edges")
            class_ids.append(ids[name])
        return cls(parents, weights=w, names=names, classes=np.asarray(class_ids, dtype=np.int64))

    @classmethod
    def chain(cls, n: int, spacing: Sequence[float] | np.ndarray | None = None) -> Tree:
        """``n`` ordered classes on a path: class ``i`` and ``i + 1`` are ``spacing[i]`` apart (default 1).

        Node ``i`` is class ``i``; node 0 is the root. EMD on this tree is ``sum_i spacing[i] *
        |CDF_p(i) - CDF_q(i)|``, the 1-D Wasserstein-1 distance between histograms.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise TreeError(f"chain length n must be a positive integer, got {n!r}")
        n = int(n)
        parents = np.arange(-1, n - 1, dtype=np.int64)
        weights = np.ones(n, dtype=np.float64)
        if spacing is not None:
            sp = np.asarray(spacing, dtype=np.float64)
            if sp.shape != (n - 1,):
                raise TreeError(f"spacing must have n - 1 = {n - 1} entries, got shape {sp.shape}")
            weights[1:] = sp
        return cls(parents, weights=weights, classes=np.arange(n, dtype=np.int64))

    # ------------------------------------------------------------------ properties
    @property
    def num_nodes(self) -> int:
        return int(self.parents.size)

    @property
    def num_classes(self) -> int:
        return int(self.classes.size)

    @property
    def num_edges(self) -> int:
        return int(self.parents.size) - 1

    @property
    def is_chain(self) -> bool:
        """True when the tree is a path whose classes are its nodes in path order (ordinal classes)."""
        return self._is_chain

    def depth(self, hops: bool = False) -> np.ndarray:
        """(num_nodes,) float64 distance of each node from the root: weighted, or in edges if ``hops``."""
        if not hops:
            return self._depth

        def build() -> np.ndarray:
            h = np.zeros(self.num_nodes, dtype=np.float64)
            _fill_depth(h, self.preorder, self.parents[self.preorder[1:]], np.ones(self.num_nodes - 1))
            h.setflags(write=False)
            return h

        return self.cached("hops", build)

    def distance_matrix(self) -> np.ndarray:
        """(num_classes, num_classes) float64 tree metric: the length of the path between two classes.

        Each distance is the sum of the edge lengths along the path, never a difference of depths, so a long edge
        above short ones does not cancel them (relative error below ``hops * 2**-53``). O(C^2) time and memory
        whatever the depth (plus a pass over the nodes above classes); cached.
        """

        def build() -> np.ndarray:
            d = class_pairs(self)
            d.setflags(write=False)
            return d

        return self.cached("distance_matrix", build)

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, computed once per ``key`` and kept with this tree (which is immutable, so the value
        stays valid): how backends and metrics keep their index arrays and per-device tensors. Not part of
        equality, hashing or serialisation. Never keeps a tensor made by a tracer (``torch.export``'s fake
        tensors, functional or ``torch.func``-wrapped ones) nor what dynamo builds symbolically
        (:func:`emdloss._inputs.cacheable`): they would poison later eager and compiled calls."""
        found = self._derived.get(key, _MISSING)
        if found is not _MISSING:
            return cast(T, found)  # stored by build() of the same key below
        value = build()
        from ._inputs import cacheable  # here: this module itself needs no torch

        if cacheable(value):
            self._derived[key] = value
        return value

    def lca_depth(self, hops: bool = True) -> np.ndarray:
        """(C, C) float64 depth of the lowest common ancestor of two classes (in edges if ``hops``, else weighted;
        the diagonal holds each class's own depth). O(C^2) time and memory; a new array on each call."""
        return class_pairs(self, lca_value=self.depth(hops=hops))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it exactly."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "parents": self.parents.tolist(),
            "weights": self.weights.tolist(),
            "names": list(self.names) if self.names is not None else None,
            "classes": self.classes.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tree:
        """Rebuild a tree from :meth:`to_dict` output, validating every field."""
        if not isinstance(data, Mapping):
            raise TreeError(f"a tree dict must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - _DICT_KEYS
        if unknown:
            raise TreeError(f"unknown keys in tree dict: {sorted(unknown)}; expected {sorted(_DICT_KEYS)}")
        if data.get("format", _FORMAT) != _FORMAT:
            raise TreeError(f"not an emdloss tree: format is {data.get('format')!r}, expected {_FORMAT!r}")
        version = data.get("version", _VERSION)
        if version != _VERSION:
            raise TreeError(f"unsupported tree format version {version!r}; this emdloss reads version {_VERSION}")
        missing = {"parents", "classes"} - set(data)
        if missing:
            raise TreeError(f"tree dict is missing required keys: {sorted(missing)}")
        weights = data.get("weights")
        if weights is not None and any(w is None for w in weights):
            raise TreeError("weights must be numbers; found null (NaN and infinity are not valid JSON weights)")
        return cls(data["parents"], weights=weights, names=data.get("names"), classes=data["classes"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tree as JSON, atomically (a temporary file in the same folder, then a rename)."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)
        write_text(path, text, make_parents=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tree:
        """Read a tree written by :meth:`save`. Plain JSON only: loading never executes code."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise TreeError(f"{path}: malformed or truncated tree JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise TreeError(f"{path}: tree JSON is not valid UTF-8 ({exc})") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return not _describe_difference(self, other, "here", "there")  # equal exactly when nothing differs

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = hash((self.parents.tobytes(), self.weights.tobytes(), self.classes.tobytes(), self.names))
            object.__setattr__(self, "_hash", h)
        return h

    def __repr__(self) -> str:
        kind = "chain" if self.is_chain else "tree"
        return f"Tree({kind}, num_nodes={self.num_nodes}, num_classes={self.num_classes})"

    def __reduce__(self) -> tuple[Any, ...]:
        # plain lists (as in to_dict), not numpy arrays: torch.load(weights_only=True) then needs only Tree itself
        # in torch.serialization.add_safe_globals; the constructor validates them again on load
        names = list(self.names) if self.names is not None else None
        return (Tree, (self.parents.tolist(), self.weights.tolist(), names, self.classes.tolist()))


# ---------------------------------------------------------------------- helpers


def _reject_constant(name: str) -> float:
    raise TreeError(f"tree JSON contains {name}, which is not a valid weight")


def _check_encodable(names: tuple[str, ...]) -> None:
    """No lone surrogates (code points U+D800..U+DFFF): :meth:`Tree.save` must be able to write names as UTF-8."""
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError:
        i, bad = next((i, ch) for i, name in enumerate(names) for ch in name if "\ud800" <= ch <= "\udfff")
        raise TreeError(
            f"names[{i}] = {names[i]!r} (node {i}) is not valid Unicode text: it holds a lone surrogate {bad!r}, "
            "which cannot be saved as UTF-8"
        ) from None


def _describe_difference(mine: Tree, other: Tree, here: str, there: str) -> str:
    """What differs between two trees, aspect by aspect, each with its first difference (empty if they are equal):
    ``"names: node 3 is 'b' here and 'x' in the state_dict"``."""
    if mine.num_nodes != other.num_nodes:
        return f"structure: {mine.num_nodes} nodes {here} and {other.num_nodes} {there}"

    def node(tree: Tree, v: int) -> str:
        return f"node {v} ({tree.names[v]!r})" if tree.names is not None else f"node {v}"

    parts = []
    for aspect, subject, a, b in (
        ("structure", "the parent of node {}", mine.parents, other.parents),
        ("classes", "class {}", mine.classes, other.classes),
        ("weights", "the edge above node {}", mine.weights, other.weights),
    ):
        if a.shape != b.shape:
            parts.append(f"{aspect}: {a.size} {aspect} {here} and {b.size} {there}")
        elif (a != b).any():
            i = int(np.flatnonzero(a != b)[0])
            x, y = (node(mine, a[i]), node(other, b[i])) if aspect == "classes" else (a[i].item(), b[i].item())
            parts.append(f"{aspect}: {subject.format(i)} is {x!s} {here} and {y!s} {there}")
    if mine.names != other.names:  # None for a tree without names
        none = (None,) * mine.num_nodes
        i, x, y = next((i, x, y) for i, (x, y) in enumerate(zip(mine.names or none, other.names or none)) if x != y)
        parts.append(f"names: node {i} is {x!r} {here} and {y!r} {there}")
    return "; and in ".join(parts)


def _dfs_preorder(parents: np.ndarray, root: int) -> tuple[np.ndarray, np.ndarray]:
    """Iterative DFS pre-order from ``root`` (children in increasing id) and subtree sizes per node.

    Returns ``(preorder, size)``; ``preorder`` is shorter than ``parents`` when some nodes are not
    reachable (they lie on or below a cycle). No recursion, so 10^6-deep chains are fine.
    """
    n = parents.size
    child_mask = parents >= 0
    kids = np.flatnonzero(child_mask)
    order = np.argsort(parents[kids], kind="stable")
    children = kids[order]  # grouped by parent, increasing child id within a group
    counts = np.bincount(parents[kids], minlength=n)
    start = np.concatenate(([0], np.cumsum(counts)))
    if np.array_equal(parents, np.arange(-1, n - 1)):  # fast path: a chain rooted at 0
        preorder = np.arange(n, dtype=np.int64)
        size = np.arange(n, 0, -1, dtype=np.int64)
        return preorder, size
    children_l = children.tolist()
    start_l = start.tolist()
    out: list[int] = []
    stack = [root]
    while stack:
        v = stack.pop()
        out.append(v)
        s, e = start_l[v], start_l[v + 1]
        if e > s:
            stack.extend(reversed(children_l[s:e]))
    preorder = np.asarray(out, dtype=np.int64)
    size = np.ones(n, dtype=np.int64)
    if preorder.size == n:
        # children follow parents in pre-order, so a reverse sweep accumulates subtree sizes.
        rev = preorder[::-1][:-1]
        par = parents[rev]
        size_l = size.tolist()
        for v, p in zip(rev.tolist(), par.tolist()):
            size_l[p] += size_l[v]
        size = np.asarray(size_l, dtype=np.int64)
    return preorder, size


def _fill_depth(depth: np.ndarray, preorder: np.ndarray, pre_parent: np.ndarray, pre_w: np.ndarray) -> None:
    """depth[v] = depth[parent(v)] + w[v] for v in pre-order (parents come first)."""
    d = depth.tolist()
    for v, p, w in zip(preorder[1:].tolist(), pre_parent.tolist(), pre_w.tolist()):
        d[v] = d[p] + w
    depth[:] = d


def _find_cycle(parents: np.ndarray, start: int) -> list[int]:
    """Follow parent pointers from ``start`` until a node repeats; return the cycle (or [] at a root)."""
    seen: dict[int, int] = {}
    path: list[int] = []
    v = start
    while v != -1 and v not in seen:
        seen[v] = len(path)
        path.append(v)
        v = int(parents[v])
    return [] if v == -1 else path[seen[v] :]
