"""Baselines as their papers define them, for logits (N, C) and class-index targets (N,).

Hierarchy-aware baselines of Bertinetto et al., "Making Better Mistakes" (CVPR 2020), checked against the
authors' code (github.com/fiveai/making-better-mistakes: ``better_mistakes/model/labels.py``,
``model/losses.py``, ``trees.py``) and experiment scripts:

Soft labels (:class:`SoftLabelLoss`). Cross-entropy against the target distribution::

    q_y(c) = exp(-beta * D[y, c] / max D) / sum_k exp(-beta * D[y, k] / max D)

``D`` is the authors' class distance: the height of the lowest common ancestor (``distance="lca"``, the
default; :func:`lca_height_matrix`); ``distance="path"`` uses the tree path length instead. Dividing by the
largest distance (``make_all_soft_labels``: ``distance_matrix /= max_distance``) is what makes their ``beta``
grid {4, 5, 10, 15, 20, 30} (:data:`BETA_GRID`; the ``softlabels_*_beta*.sh`` scripts) meaningful: without it,
``beta = 5`` over path lengths >= 2 gives labels one-hot to four decimals, i.e. cross-entropy. For trees whose
classes are all leaves at one depth with unit edges, the path length is twice the LCA height, so after the
division the two choices give identical labels.

Hierarchical cross-entropy (:class:`HXELoss`). The leaf probability factorises along the path
root = C^(h), ..., C^(0) = y into conditionals ``p(C^(l) | C^(l+1)) = P(C^(l)) / P(C^(l+1))`` where ``P(v)``
is the softmax mass of the classes below node ``v``::

    HXE(p, y) = - sum_{l=0}^{h-1} lambda(C^(l)) * log p(C^(l) | C^(l+1)),   lambda(v) = exp(-alpha * depth(v))

``depth(v)`` counts hops from the root (``get_exponential_weighting``: the weight of the edge above tree
position ``pos`` is ``exp(-alpha * len(pos))``), so ``alpha > 0`` stresses the coarse decisions near the root.
With ``normalize=True`` (their default) every weight is divided by the sum of ``exp(-alpha * depth(v))`` over
all nodes of the tree, root included, as their code does; this rescales the loss only (it matters for plain
SGD, not for Adam). ``alpha = 0, normalize=False`` is plain cross-entropy (the sum telescopes to
``-log p(y)``). Published grid: :data:`ALPHA_GRID` (``hxe_*_alpha*.sh``: 0.1-0.6 on tieredImageNet-H, up to
0.9 on iNaturalist-19).

CE + lambda * relaxed EMD (:class:`CEPlusEMDLoss`): ``CE(z, y) + lam * EMD_rho(softmax(z), y)`` with rho = 2 by
default, over :data:`LAMBDA_GRID`.

Squared EMD on a chain: for ``Tree.chain(C)`` (unit spacing) the relaxed EMD with rho = 2 is
``sum_{k<C} (CDF_p(k) - CDF_q(k))^2`` (the edge between classes k and k+1 carries the flow
``CDF_p(k) - CDF_q(k)``), which is exactly dlordinal's ``EMDLoss`` (no normalisation) and ``C`` times Hou, Yu
and Samaras's squared EMD (2016), who put a factor ``(1/C)^(1/l)`` in front of the l-norm of the CDF difference
and square the l = 2 distance (:func:`hou_squared_emd`, an independent transcription used by the tests).

Ordinal baselines CORAL (Cao et al. 2020) and CORN (Shi et al. 2023) come from the ``coral-pytorch`` package
(:func:`ordinal_head`, :func:`ordinal_loss`, :func:`ordinal_probabilities`); ``pip install emdloss[bench]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emdloss._optional import require
from emdloss.functional import emd
from emdloss.tree import Tree

__all__ = [
    "ALPHA_GRID",
    "BETA_GRID",
    "LAMBDA_GRID",
    "CEPlusEMDLoss",
    "HXELoss",
    "SoftLabelLoss",
    "ancestor_matrix",
    "hou_squared_emd",
    "lca_height_matrix",
    "ordinal_head",
    "ordinal_loss",
    "ordinal_probabilities",
]

#: Bertinetto et al.'s soft-label ``beta`` values (experiments/softlabels_*_beta{04,05,10,15,20,30}.sh).
BETA_GRID: tuple[float, ...] = (4.0, 5.0, 10.0, 15.0, 20.0, 30.0)
#: Bertinetto et al.'s HXE ``alpha`` values (experiments/hxe_*_alpha*.sh; the union over their two datasets).
ALPHA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9)
#: ``lam`` of CE + lam * relaxed EMD: log-spaced, from a light regulariser to EMD-dominated.
LAMBDA_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)


def _check_tree(tree: object) -> None:
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")


def _check_nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


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


def lca_height_matrix(tree: Tree) -> np.ndarray:
    """(C, C) height of the LCA of two classes, in hops: ``max_k depth(class_k) - depth(LCA)`` (0 on the diagonal
    for classes at the deepest level), Bertinetto et al.'s class distance."""
    lca = tree.lca_depth(hops=True)
    return float(np.max(np.diag(lca))) - lca


class SoftLabelLoss(nn.Module):
    """Cross-entropy against Bertinetto et al.'s soft labels (see the module docstring); mean over the batch.

    Args:
        tree: the class hierarchy.
        beta: hardness, >= 0 (their grid :data:`BETA_GRID`; 0 gives uniform labels).
        distance: "lca" (LCA height, theirs) or "path" (tree path length).
    """

    def __init__(self, tree: Tree, beta: float = 10.0, distance: str = "lca") -> None:
        super().__init__()
        _check_tree(tree)
        self.beta = _check_nonneg("beta", beta)
        if distance not in ("lca", "path"):
            raise ValueError(f'distance must be "lca" or "path", got {distance!r}')
        d = lca_height_matrix(tree) if distance == "lca" else tree.distance_matrix()
        dmax = float(d.max())
        d = d / dmax if dmax > 0 else d  # their normalisation: distances in [0, 1]
        soft = torch.softmax(-self.beta * torch.tensor(d, dtype=torch.float64), dim=1)
        self.register_buffer("soft", soft.float(), persistent=False)  # (C, C): row y = q_y

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        q = self.soft[target]
        return -(q * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean().to(logits.dtype)


class HXELoss(nn.Module):
    """Hierarchical cross-entropy (see the module docstring); mean over the batch.

    Args:
        tree: the class hierarchy.
        alpha: decay of the weights with depth, >= 0 (their grid :data:`ALPHA_GRID`).
        normalize: divide the weights by ``sum_v exp(-alpha * depth(v))`` over all nodes, as the authors do.
    """

    def __init__(self, tree: Tree, alpha: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        _check_tree(tree)
        self.alpha = _check_nonneg("alpha", alpha)
        self.normalize = bool(normalize)
        anc = ancestor_matrix(tree)  # (nodes, C)
        lam = np.exp(-self.alpha * np.asarray(tree.depth(hops=True), dtype=np.float64))
        if self.normalize:
            lam = lam / lam.sum()
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
        # log P(v) = log of the softmax mass below v, in float32 with a floor.
        p = torch.softmax(logits.float(), dim=1)
        log_node = torch.log((p @ self.anc_t).clamp_min(1e-30))  # (N, nodes)
        return -(self.coef[target] * log_node).sum(dim=1).mean().to(logits.dtype)


class CEPlusEMDLoss(nn.Module):
    """``CE(z, y) + lam * EMD_rho(softmax(z), y)`` on ``tree``; mean over the batch. ``lam >= 0``, ``rho >= 1``."""

    def __init__(self, tree: Tree, lam: float = 1.0, rho: float = 2.0) -> None:
        super().__init__()
        _check_tree(tree)
        self.lam = _check_nonneg("lam", lam)
        if not (isinstance(rho, (int, float)) and np.isfinite(rho) and rho >= 1):
            raise ValueError(f"rho must be a finite number >= 1, got {rho!r}")
        self.rho = float(rho)
        self.tree = tree

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target) + self.lam * emd(logits, target, self.tree, rho=self.rho)


def hou_squared_emd(probs: Tensor, target: Tensor, normalized: bool = True) -> Tensor:
    """Hou et al.'s (2016) squared EMD on ordered classes, per row: ``(1/C) sum_k (CDF_p(k) - CDF_t(k))^2``.

    Args:
        probs: (N, C) predicted distributions. target: (N,) class indices or (N, C) distributions.
        normalized: keep their ``1/C`` factor; without it this is dlordinal's ``EMDLoss`` per row.
    Returns: (N,) float tensor.
    """
    c = probs.shape[1]
    t = F.one_hot(target, c).to(probs.dtype) if target.dim() == 1 else target.to(probs.dtype)
    sq = ((torch.cumsum(probs, 1) - torch.cumsum(t, 1)) ** 2).sum(1)
    return sq / c if normalized else sq


# ---------------------------------------------------------------------- ordinal baselines (coral-pytorch)

ORDINAL = ("coral", "corn")


def _coral() -> Any:
    """The coral-pytorch package (optional: the bench extra), with an install hint when missing."""
    for sub in ("layers", "losses", "dataset"):
        require(f"coral_pytorch.{sub}", "bench", "the CORAL/CORN baselines")
    import coral_pytorch

    return coral_pytorch


def ordinal_head(name: str, d_in: int, num_classes: int) -> nn.Module:
    """The output layer each method prescribes: CORAL's ``CoralLayer`` (one weight vector, K-1 ordered biases),
    CORN's plain ``Linear(d_in, K-1)``."""
    cp = _coral()
    if name == "coral":
        return cp.layers.CoralLayer(d_in, num_classes)
    if name == "corn":
        return nn.Linear(d_in, num_classes - 1)
    raise ValueError(f"ordinal baseline must be one of {ORDINAL}, got {name!r}")


def ordinal_loss(name: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(logits (N, K-1), y (N,))`` from coral-pytorch: ``coral_loss`` on the extended binary labels, or
    ``corn_loss``."""
    cp = _coral()
    if name == "coral":
        levels = cp.dataset.levels_from_labelbatch
        return lambda z, y: cp.losses.coral_loss(z, levels(y, num_classes).to(z.dtype))
    if name == "corn":
        return lambda z, y: cp.losses.corn_loss(z, y, num_classes)
    raise ValueError(f"ordinal baseline must be one of {ORDINAL}, got {name!r}")


def ordinal_probabilities(name: str, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Class distribution (N, K) and predicted class (N,) of a CORAL or CORN head's (N, K-1) logits.

    ``P(y > k)`` is ``sigmoid(z_k)`` for CORAL and ``prod_{j<=k} sigmoid(z_j)`` for CORN (conditional
    probabilities); ``p_k = P(y > k-1) - P(y > k)`` (clipped at 0 and renormalised: CORAL's thresholds can cross
    in principle), and the prediction is the methods' own rule, the number of ``P(y > k) > 0.5``.
    """
    s = torch.sigmoid(logits.double())
    gt = s if name == "coral" else torch.cumprod(s, dim=1)  # P(y > k), k = 0..K-2
    ones, zeros = torch.ones_like(gt[:, :1]), torch.zeros_like(gt[:, :1])
    cdf_gt = torch.cat([ones, gt, zeros], dim=1)  # P(y > k-1) for k = 0..K
    p = (cdf_gt[:, :-1] - cdf_gt[:, 1:]).clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    return p, (gt > 0.5).sum(1)
