"""Hierarchy-aware baselines from Bertinetto et al., "Making Better Mistakes" (CVPR 2020).

Both are losses on logits (N, C) and class-index targets (N,), built once per tree.

Hierarchical cross-entropy (HXE). The leaf probability factorises along the path root = C^(h), ..., C^(0) = y
into conditionals ``p(C^(l) | C^(l+1)) = P(C^(l)) / P(C^(l+1))`` where ``P(v)`` is the softmax mass of the
classes below node ``v``. HXE weights the log of each conditional::

    HXE(p, y) = - sum_{l=0}^{h-1} lambda(C^(l)) * log p(C^(l) | C^(l+1)),   lambda(v) = exp(-alpha * depth(v))

``depth(v)`` counts hops from the root, as in the authors' code (``get_exponential_weighting``: the weight of
a tree position ``p`` is ``exp(-alpha * len(p))``), so ``alpha > 0`` stresses the coarse decisions near the
root; their code also rescales all weights to sum to 1 over the tree, which only rescales the loss and is
omitted here. ``alpha = 0`` gives the plain cross-entropy (the sum telescopes to ``-log p(y)``).

Soft labels. Cross-entropy against the target distribution
``q_y(c) = exp(-beta * D[y, c]) / sum_k exp(-beta * D[y, k])`` where ``D`` is the tree distance between
classes (for unit edge weights and leaves at equal depth, twice the LCA height the authors use; ``beta`` here
corresponds to their ``beta / 2``). Large ``beta`` approaches one-hot labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from emdloss.tree import Tree

__all__ = ["HXELoss", "SoftLabelLoss", "ancestor_matrix"]


def ancestor_matrix(tree: Tree) -> np.ndarray:
    """(num_nodes, C) 0/1 matrix: entry [v, c] is 1 when class ``c`` lies in the subtree of node ``v``."""
    a = np.zeros((tree.num_nodes, tree.num_classes), dtype=np.float64)
    parents = np.asarray(tree.parents)
    for c, node in enumerate(np.asarray(tree.classes)):
        v = int(node)
        while v >= 0:
            a[v, c] = 1.0
            v = int(parents[v])
    return a


class HXELoss(nn.Module):
    """Hierarchical cross-entropy (see the module docstring). ``alpha >= 0``; mean over the batch."""

    def __init__(self, tree: Tree, alpha: float = 0.1) -> None:
        super().__init__()
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
        if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        anc = ancestor_matrix(tree)  # (nodes, C)
        lam = np.exp(-self.alpha * tree.depth(hops=True))
        parents = np.asarray(tree.parents)
        # coef[y, v]: the loss is -sum_v coef[y, v] * log P(v); each non-root v on y's path adds
        # +lambda(v) at v and -lambda(v) at its parent.
        coef = np.zeros((tree.num_classes, tree.num_nodes))
        for v in np.flatnonzero(parents >= 0):
            on_path = anc[v] > 0  # classes below v: v is on their path
            coef[on_path, v] += lam[v]
            coef[on_path, parents[v]] -= lam[v]
        self.register_buffer("anc_t", torch.from_numpy(anc.T.copy()).float(), persistent=False)  # (C, nodes)
        self.register_buffer("coef", torch.from_numpy(coef).float(), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # log P(v) = logsumexp of the logits below v, computed as log(softmax @ anc) in float32 with a floor.
        p = torch.softmax(logits.float(), dim=1)
        log_node = torch.log((p @ self.anc_t).clamp_min(1e-30))  # (N, nodes)
        return -(self.coef[target] * log_node).sum(dim=1).mean().to(logits.dtype)


class SoftLabelLoss(nn.Module):
    """Cross-entropy against the soft labels ``softmax(-beta * D[y])`` (see the module docstring)."""

    def __init__(self, tree: Tree, beta: float = 10.0) -> None:
        super().__init__()
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
        if not (isinstance(beta, (int, float)) and np.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)
        d = torch.tensor(tree.distance_matrix(), dtype=torch.float64)
        self.register_buffer("soft", torch.softmax(-self.beta * d, dim=1).float(), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        q = self.soft[target]
        return -(q * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean().to(logits.dtype)
