"""Pictures of what the EMD does (matplotlib, optional extra ``emdloss[plot]``, imported lazily).

- :func:`plot_tree_flows`: the hierarchy with the optimal transport of one prediction: every drawn edge
  carries ``|f_e|`` mass (line width), upwards (red: the prediction has surplus below the edge) or
  downwards (blue: deficit below, mass flows in). Node size shows predicted mass, the true class is a star.
  Large trees (ImageNet's 1,000 classes) are cut to the edges that carry the most mass plus the path of the
  true class, at most ``max_nodes`` nodes, so the picture stays legible.
- :func:`plot_chain_cdfs`: for ordered classes, the two CDFs and the area between them (= the EMD).

Layout: a tidy tree computed from the DFS order: leaves of the drawn tree get successive x positions in
pre-order, an internal node sits at the middle of its first and last child, y is minus the depth in edges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._optional import require
from .tree import Tree

__all__ = ["plot_chain_cdfs", "plot_tree_flows", "select_nodes", "tidy_layout"]

UP, DOWN = "#c0392b", "#2471a3"


def _as_dist(x: Tensor | np.ndarray | Sequence[float], c: int, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.shape != (c,):
        raise ValueError(f"{name} must be one distribution of shape ({c},), got {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or abs(a.sum() - 1) > 1e-3:
        raise ValueError(f"{name} must be a probability distribution (finite, >= 0, sums to 1)")
    return a


def _target_dist(target: Any, c: int) -> tuple[np.ndarray, int | None]:
    is_index = isinstance(target, Tensor) and target.numel() == 1 and not target.dtype.is_floating_point
    if isinstance(target, (int, np.integer)) or is_index:
        k = int(target)
        if not 0 <= k < c:
            raise ValueError(f"target class {k} is outside [0, {c})")
        q = np.zeros(c)
        q[k] = 1.0
        return q, k
    return _as_dist(target, c, "target"), None


def select_nodes(tree: Tree, flow: np.ndarray, keep: Sequence[int] = (), max_nodes: int = 40) -> np.ndarray:
    """Ancestor-closed set of at most ~``max_nodes`` nodes: the nodes ``keep`` (with their ancestors), then
    the children of the edges with the largest ``|flow|`` (flow per node, 0 at the root) and their
    ancestors, in decreasing ``|flow|`` order. Returns a boolean mask over nodes."""
    parents = tree.parents
    mask = np.zeros(tree.num_nodes, dtype=bool)

    def add(v: int) -> int:
        added = 0
        while v != -1 and not mask[v]:
            mask[v] = True
            added += 1
            v = int(parents[v])
        return added

    count = 0
    for v in keep:
        count += add(int(v))
    for v in np.argsort(-np.abs(flow), kind="stable").tolist():
        if count >= max_nodes or abs(flow[v]) <= 1e-6:
            break
        count += add(v)
    add(tree.root)
    return mask


def tidy_layout(tree: Tree, mask: np.ndarray | None = None) -> dict[int, tuple[float, float]]:
    """(x, y) for every node in ``mask`` (ancestor-closed; default all): leaves of the drawn tree at
    successive x in DFS pre-order, parents centred over their first and last drawn child, y = -hops."""
    if mask is None:
        mask = np.ones(tree.num_nodes, dtype=bool)
    hops = tree.depth(hops=True)
    order = [v for v in tree.preorder.tolist() if mask[v]]
    kids: dict[int, list[int]] = {v: [] for v in order}
    for v in order:
        p = int(tree.parents[v])
        if p >= 0:
            kids[p].append(v)
    pos: dict[int, tuple[float, float]] = {}
    x = 0.0
    for v in order:  # drawn leaves get successive x in pre-order
        if not kids[v]:
            pos[v] = (x, -float(hops[v]))
            x += 1.0
    for v in reversed(order):  # reversed pre-order: children are placed before their parent
        if kids[v]:
            xs = [pos[c][0] for c in kids[v]]
            pos[v] = ((min(xs) + max(xs)) / 2.0, -float(hops[v]))
    return pos


def plot_tree_flows(
    probs: Tensor | np.ndarray,
    target: int | Tensor | np.ndarray,
    tree: Tree,
    *,
    labels: Mapping[str, str] | Sequence[str] | None = None,
    max_nodes: int = 40,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw ``tree`` with the flows that move ``probs`` onto ``target``; returns the matplotlib Figure.

    Args:
        probs: (C,) predicted distribution over the tree's classes.
        target: a class index, or a (C,) target distribution.
        tree: the hierarchy.
        labels: display names: a mapping from node name to label (e.g. WordNet lemmas from
            :func:`emdloss.hierarchies.read_words`) or a sequence with one label per node; default the
            node names (or ids).
        max_nodes: draw at most about this many nodes (the path to the true class and the edges carrying
            the most mass); smaller trees are drawn whole.
        ax: an Axes to draw into (default: a new figure sized to the drawn tree).
        title: default states the EMD.
    """
    plt = require("matplotlib.pyplot", "plot", "emdloss.plot.plot_tree_flows")
    Line2D = require("matplotlib.lines", "plot").Line2D

    from .functional import flows

    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
    c = tree.num_classes
    p = _as_dist(probs, c, "probs")
    q, true_k = _target_dist(target, c)
    f_edges = flows(torch.from_numpy(p), torch.from_numpy(q), tree).numpy()
    flow = np.zeros(tree.num_nodes)
    flow[tree.edge_nodes] = f_edges
    w = tree.weights
    emd_value = float(np.sum(np.abs(flow) * w))

    keep = [int(tree.classes[true_k])] if true_k is not None else [int(tree.classes[np.argmax(q)])]
    keep.append(int(tree.classes[np.argmax(p)]))
    if tree.num_nodes <= max_nodes:
        mask = np.ones(tree.num_nodes, dtype=bool)
    else:
        mask = select_nodes(tree, flow, keep, max_nodes)
    pos = tidy_layout(tree, mask)

    node_label = _labeller(tree, labels)
    n_levels = int(-min(y for _, y in pos.values())) + 1
    if ax is None:
        n_leaves = sum(1 for v in pos if _is_leaf(pos, v, tree))
        size = (float(np.clip(2 + 0.8 * n_leaves, 7, 24)), float(np.clip(1.5 + 0.9 * n_levels, 3.5, 11)))
        fig, ax = plt.subplots(figsize=size)
    else:
        fig = ax.figure

    fmax = max(float(np.abs(flow[mask]).max()), 1e-12)
    for v, (x, y) in pos.items():
        par = int(tree.parents[v])
        if par < 0:
            continue
        px, py = pos[par]
        f = flow[v]
        strength = abs(f) / fmax
        if abs(f) < 1e-9:
            ax.plot([x, px], [y, py], color="#bbbbbb", lw=0.8, zorder=1)
            continue
        color = UP if f > 0 else DOWN
        ax.plot([x, px], [y, py], color=color, lw=0.8 + 6 * strength, alpha=0.85, zorder=1, solid_capstyle="round")
        # an arrow head in the middle of the edge shows the direction of transport
        mx, my = (x + px) / 2, (y + py) / 2
        dx, dy = (px - x, py - y) if f > 0 else (x - px, y - py)
        norm = max(np.hypot(dx, dy), 1e-9)
        ax.annotate(
            "",
            xy=(mx + 0.12 * dx / norm, my + 0.12 * dy / norm),
            xytext=(mx - 0.12 * dx / norm, my - 0.12 * dy / norm),
            arrowprops=dict(arrowstyle="-|>", color=color, lw=0, mutation_scale=10 + 10 * strength),
            zorder=3,
        )
        if abs(f) >= 0.01:
            ax.text(mx + 0.08, my, f"{abs(f):.2f}", fontsize=7, color=color, ha="left", va="center", zorder=4)

    class_of = {int(node): k for k, node in enumerate(tree.classes.tolist())}
    for v, (x, y) in pos.items():
        k = class_of.get(v)
        mass = p[k] if k is not None else 0.0
        is_true = k is not None and k == true_k
        ax.scatter(
            [x],
            [y],
            s=20 + 600 * mass,
            color="#f39c12" if k is not None else "#555555",
            edgecolor="black",
            linewidth=0.5,
            zorder=5,
        )
        if is_true:
            ax.scatter([x], [y], s=260, marker="*", color="#27ae60", edgecolor="black", linewidth=0.6, zorder=6)
        leaf = _is_leaf(pos, v, tree)
        ax.text(
            x,
            y - 0.12 if leaf else y + 0.12,
            node_label(v),
            fontsize=7,
            rotation=40 if leaf else 0,
            ha="right" if leaf else "center",
            va="top" if leaf else "bottom",
            zorder=7,
        )

    hidden = tree.num_nodes - int(mask.sum())
    note = f"  ({hidden} nodes with little flow not drawn)" if hidden else ""
    ax.set_title(title or f"EMD = {emd_value:.3f}{note}")
    ax.legend(
        handles=[
            Line2D([], [], color=UP, lw=3, label="surplus moves up"),
            Line2D([], [], color=DOWN, lw=3, label="mass flows down"),
            Line2D([], [], marker="o", color="w", markerfacecolor="#f39c12", markersize=8, label="predicted mass"),
            Line2D([], [], marker="*", color="w", markerfacecolor="#27ae60", markersize=12, label="true class"),
        ],
        loc="upper right",
        fontsize=7,
        frameon=False,
    )
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(-(n_levels - 1) - 1.2, 0.6)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _is_leaf(pos: Mapping[int, tuple[float, float]], v: int, tree: Tree) -> bool:
    lo = int(tree.position[v])
    return not any(int(tree.preorder[k]) in pos for k in range(lo + 1, int(tree.subtree_end[lo])))


def _labeller(tree: Tree, labels: Mapping[str, str] | Sequence[str] | None) -> Callable[[int], str]:
    names = tree.names

    def label(v: int) -> str:
        name = names[v] if names is not None else str(v)
        if labels is None:
            text = name
        elif isinstance(labels, Mapping):
            text = labels.get(name, name)
        else:
            text = labels[v]
        return text if len(text) <= 22 else text[:20] + "…"

    return label


def plot_chain_cdfs(
    probs: Tensor | np.ndarray,
    target: int | Tensor | np.ndarray,
    *,
    class_labels: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """For ordered classes: the CDFs of ``probs`` and ``target`` and the shaded area between them.

    The area is the EMD on the chain, ``sum_i spacing_i |CDF_p(i) - CDF_q(i)|``. Returns the Figure.

    Args:
        probs: (K,) predicted distribution. target: class index or (K,) distribution.
        class_labels: tick labels (default 0..K-1). spacing: (K-1,) gaps between classes (default 1).
    """
    plt = require("matplotlib.pyplot", "plot", "emdloss.plot.plot_chain_cdfs")

    if isinstance(probs, Tensor):
        p = probs.detach().cpu().double().numpy().reshape(-1)
    else:
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
    k = p.size
    p = _as_dist(p, k, "probs")
    q, _ = _target_dist(target, k)
    gaps = np.ones(k - 1) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if gaps.shape != (k - 1,) or np.any(gaps < 0):
        raise ValueError(f"spacing must have K - 1 = {k - 1} non-negative entries")
    xs = np.concatenate([[0.0], np.cumsum(gaps)])
    cp, cq = np.cumsum(p), np.cumsum(q)
    emd_value = float(np.sum(gaps * np.abs(cp - cq)[:-1]))
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * k + 2), 3.4))
    else:
        fig = ax.figure
    # step CDFs: value on [x_i, x_{i+1}) is the CDF at class i
    ax.fill_between(xs, cp, cq, step="post", color="#f5b041", alpha=0.45, label=f"area = EMD = {emd_value:.3f}")
    ax.step(xs, cp, where="post", color="#c0392b", lw=2, label="prediction CDF")
    ax.step(xs, cq, where="post", color="#2471a3", lw=2, ls="--", label="target CDF")
    bar_w = 0.35 * (float(np.min(gaps)) if gaps.size and np.min(gaps) > 0 else 1.0)
    ax.bar(xs, p, width=bar_w, color="#c0392b", alpha=0.25, label="prediction")
    ax.set_xticks(xs)
    ax.set_xticklabels(class_labels if class_labels is not None else [str(i) for i in range(k)], fontsize=8)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("cumulative probability")
    ax.set_title(title or "EMD on ordered classes")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
