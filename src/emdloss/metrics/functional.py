"""Hierarchy-aware and ordinal evaluation metrics as functions: tensors in, 0-d float64 tensors out.

The hierarchical metrics follow Bertinetto et al., "Making Better Mistakes: Leveraging Class Hierarchies with
Deep Networks" (CVPR 2020), as their code computes them (``better_mistakes/model/run_xent.py`` in
github.com/fiveai/making-better-mistakes). Two class distances are offered, chosen by ``distance=``:

- ``"lca"`` (the default, theirs): the *height of the lowest common ancestor*,
  ``h(a, b) = H - depth(LCA(a, b))`` in edges, with ``H`` the largest depth (in edges) of any class and edge
  lengths ignored. ``h(a, a) = 0``. On their trees this reproduces their published distance files exactly
  (``tests/test_metrics_literature.py``).
- ``"path"``: the weighted tree path length ``D(a, b)`` (the ground cost of :class:`emdloss.EMDLoss`).

Functions (every one returns a 0-d ``float64`` tensor on the input's device, NaN where undefined, except
:func:`emd_per_sample`, which returns (N,)):

- :func:`topk_accuracy` -- fraction of samples whose true class is among the k highest scores.
- :func:`mistake_severity` -- mean class distance between the top-1 prediction and the truth over the
  *mistakes* (top-1 wrong); with ``"lca"`` this is Bertinetto et al.'s "mistake severity".
- :func:`hierarchical_distance_topk` -- mean over samples of the mean class distance of the k highest-scoring
  classes to the truth, correct ones counting 0; with ``"lca"`` Bertinetto et al.'s "average hierarchical
  distance@k".
- :func:`emd_per_sample` -- exact EMD (rho = 1, path distances) of each predicted distribution to its target.
- :func:`mean_absolute_error`, :func:`quadratic_weighted_kappa` -- for ordered classes (chains).

Distance and LCA matrices are cached on the tree (:meth:`~emdloss.Tree.cached`), per device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..tree import Tree

__all__ = [
    "DISTANCES",
    "emd_per_sample",
    "hierarchical_distance_topk",
    "lca_mistake_height",
    "mean_absolute_error",
    "mistake_severity",
    "quadratic_weighted_kappa",
    "topk_accuracy",
]

Distance = Literal["lca", "path"]
#: the class distances the hierarchical metrics accept: LCA height (Bertinetto et al.) or weighted path length
DISTANCES: tuple[str, ...] = ("lca", "path")


# ---------------------------------------------------------------------- cached tree matrices


def _distance_tensor(tree: Tree, device: torch.device) -> Tensor:
    """(C, C) float64 weighted path lengths ``D`` between classes on ``device`` (cached on the tree)."""
    return tree.cached(
        ("metrics.dist", str(device)),
        lambda: torch.from_numpy(np.array(tree.distance_matrix(), dtype=np.float64)).to(device),
    )


def _lca_height_tensor(tree: Tree, device: torch.device) -> Tensor:
    """(C, C) float64 LCA height ``H - depth_hops(LCA(a, b))``, ``H`` = largest hop depth of any class.

    The diagonal of ``lca_depth`` is each class's own depth, so ``H`` is its maximum. ``h(a, a) = H - depth(a)``
    is 0 only for the deepest classes; the metrics never read the diagonal for a distance (a correct prediction
    counts 0, as in Bertinetto et al.'s ``DistanceDict``), so the diagonal is set to 0 here.
    """

    def build() -> Tensor:
        lca = tree.lca_depth(hops=True)
        top = float(np.max(np.diag(lca)))
        h = top - lca
        np.fill_diagonal(h, 0.0)
        return torch.from_numpy(np.ascontiguousarray(h)).to(device)

    return tree.cached(("metrics.lca_height", str(device)), build)


def class_distance_matrix(tree: Tree, distance: str = "lca", device: torch.device | str = "cpu") -> Tensor:
    """(C, C) float64 class distances used by the metrics: ``"lca"`` heights or ``"path"`` lengths (cached).

    Both are 0 on the diagonal and symmetric. ``"lca"``: ``H - depth_hops(LCA(a, b))`` for ``a != b`` (edge
    lengths ignored); ``"path"``: the weighted tree distance :meth:`emdloss.Tree.distance_matrix`.
    """
    _check_tree(tree)
    return _PAIR_MATRIX[_check_distance(distance)](tree, torch.device(device))


_PAIR_MATRIX: dict[str, Callable[[Tree, torch.device], Tensor]] = {
    "lca": _lca_height_tensor,
    "path": _distance_tensor,
}


# ---------------------------------------------------------------------- argument checks


def _check_tree(tree: Tree) -> None:
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")


def _check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(
            f"distance must be 'lca' (height of the lowest common ancestor, Bertinetto et al. 2020) or 'path' "
            f"(weighted tree path length), got {distance!r}"
        )
    return distance


def _check_k(k: int, c: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
        raise ValueError(f"k must be an integer in [1, {c}], got {k!r}")
    return k


def _check_indices(t: Tensor, name: str, num_classes: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    t = t.reshape(-1).long()
    if num_classes is not None and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains class index {bad}, outside [0, {num_classes})")
    return t


def _check_pair(pred: Tensor, target: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor]:
    p = _check_indices(pred, "pred", num_classes)
    t = _check_indices(target, "target", num_classes)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same number of elements, got {pred.shape} and {target.shape}")
    if p.device != t.device:
        raise ValueError(f"pred is on {p.device} but target is on {t.device}")
    return p, t


def _rows(scores: Tensor, target: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """(N, C) or (N, C, d1, ..., dk) scores and (N,) or (N, d1, ..., dk) class indices -> (M, C) rows and (M,)
    targets, with the classes along dim 1 as in the losses. Shapes only; :func:`_check_rows` checks values."""
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating torch.Tensor of shape (N, C) or (N, C, d1, ..., dk)")
    if scores.dim() < 2:
        raise ValueError(f"{what} must have shape (N, C) or (N, C, d1, ..., dk), got {tuple(scores.shape)}")
    t = _check_indices(target, "target")
    n, c = scores.shape[0], scores.shape[1]
    if scores.dim() == 2:
        if t.numel() != n:
            raise ValueError(f"target must have N = {n} entries, got {t.numel()}")
        return scores, t
    expected = (n, *scores.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape (N, d1, ..., dk) = {expected} for {what} of shape {tuple(scores.shape)} "
            f"(classes along dim 1), got {tuple(target.shape)}"
        )
    return scores.movedim(1, -1).reshape(-1, c), t


def _check_rows(x: Tensor, t: Tensor, k: int, num_classes: int | None, what: str, logits: bool = True) -> None:
    """Rows ``x`` (M, C) and targets ``t`` (M,) from :func:`_rows`: class count, ``k``, class range, finite values."""
    c = x.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{what} has {c} classes but the tree has {num_classes}")
    _check_k(k, c)
    _check_indices(t, "target", c)
    _check_finite(x, what, logits)


def _check_finite(x: Tensor, what: str, logits: bool = True) -> None:
    """No NaN or infinity in ``x`` (classes along dim 1). Logits may hold -inf (probability 0, as for the losses
    and ``cross_entropy``), but not NaN, +inf or a row of only -inf: such a row has no softmax and no ranking."""
    if x.numel() == 0:
        return
    finite = torch.isfinite(x.amax(dim=1)).all() if logits else torch.isfinite(x).all()
    if not bool(finite):
        detail = " (NaN, +inf, or a row of only -inf)" if logits else ""
        raise ValueError(f"{what} contain NaN or infinite values{detail}")


def _check_logits(
    logits: Tensor, target: Tensor, k: int, num_classes: int | None = None, what: str = "logits"
) -> tuple[Tensor, Tensor]:
    x, t = _rows(logits, target, what)
    _check_rows(x, t, k, num_classes, what)
    return x, t


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as float64, NaN where ``den == 0`` (nothing was counted)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


# ---------------------------------------------------------------------- per-batch statistics (shared with the
# Metric classes, which accumulate these sums and counts across batches and processes)


def _topk_correct(x: Tensor, t: Tensor, k: int) -> Tensor:
    """(M,) bool: the target is among the ``k`` highest scores (ties broken by ``torch.topk``)."""
    return (x.topk(k, dim=1).indices == t[:, None]).any(dim=1)


def _severity_sums(p: Tensor, t: Tensor, tree: Tree, distance: str) -> tuple[Tensor, Tensor]:
    """(sum of ``d(p_i, t_i)`` over the mistakes ``p_i != t_i``, number of mistakes), float64."""
    wrong = p != t
    d = _PAIR_MATRIX[distance](tree, p.device)
    return d[p[wrong], t[wrong]].sum(), wrong.sum().double()


def _topk_distance_sum(x: Tensor, t: Tensor, tree: Tree, k: int, distance: str) -> Tensor:
    """``sum_i (1/k) sum_{j in topk(x_i)} d(j, t_i)``, float64 (correct entries count 0)."""
    d = _PAIR_MATRIX[distance](tree, x.device)
    return d[x.topk(k, dim=1).indices, t[:, None]].mean(dim=1).sum()


def _confusion(p: Tensor, t: Tensor, num_classes: int) -> Tensor:
    """(K, K) float64 counts, rows = target, columns = prediction."""
    k = num_classes
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).double()


def _kappa_from_confusion(conf: Tensor) -> Tensor:
    """Quadratic weighted kappa of a (K, K) confusion matrix; NaN when undefined (no samples, K = 1, or a zero
    expected disagreement)."""
    k = conf.shape[0]
    conf = conf.double()
    n = conf.sum()
    if k == 1:
        return _nan(conf.device)
    idx = torch.arange(k, dtype=torch.float64, device=conf.device)
    w = (idx[:, None] - idx[None, :]).square() / (k - 1) ** 2
    expected = conf.sum(1)[:, None] * conf.sum(0)[None, :] / n.clamp_min(1e-300)
    den = (w * expected).sum()
    return torch.where((n > 0) & (den > 0), 1.0 - (w * conf).sum() / den.clamp_min(1e-300), _nan(conf.device))


def _abs_error_from_confusion(conf: Tensor) -> Tensor:
    """Sum of ``|pred - target|`` over the samples of a (K, K) confusion matrix."""
    k = conf.shape[0]
    idx = torch.arange(k, dtype=torch.float64, device=conf.device)
    return ((idx[:, None] - idx[None, :]).abs() * conf).sum()


# ---------------------------------------------------------------------- functional metrics


def topk_accuracy(logits: Tensor, target: Tensor, k: int = 1) -> Tensor:
    """Fraction of rows of ``logits`` (N, C) whose ``target`` (N,) is among the ``k`` largest entries.

    ``mean_i 1[target_i in topk(logits_i)]`` as a 0-d float64 tensor. Spatial inputs (N, C, d1, ..., dk) with
    targets (N, d1, ..., dk) count every position. Ties are broken by ``torch.topk`` (lower index first on the
    CPU). NaN for an empty batch; NaN, +inf or a row of only -inf in ``logits`` is a ValueError.
    """
    x, t = _check_logits(logits, target, k)
    if t.numel() == 0:
        return _nan(x.device)
    return _topk_correct(x, t, k).double().mean()


def mistake_severity(pred: Tensor, target: Tensor, tree: Tree, distance: Distance = "lca") -> Tensor:
    """Mean class distance between prediction and truth over the mistakes (Bertinetto et al. 2020).

    ``sum_{i: p_i != t_i} d(p_i, t_i) / #{i: p_i != t_i}``, pooled over all the mistakes (not averaged per
    batch), as ``ilsvrc_dist_mistakes/avg01`` in their ``run_xent.py``.

    Args:
        pred, target: (N,) (or any equal shapes) class indices; ``pred`` is the top-1 prediction.
        tree: the class hierarchy.
        distance: ``"lca"`` (default): ``d`` = height of the lowest common ancestor,
            ``H - depth_hops(LCA)`` with ``H`` the largest class depth in edges -- their "mistake severity";
            ``"path"``: ``d`` = weighted tree path length (the EMD ground cost), reported as
            ``severity_path`` by :class:`~emdloss.metrics.HierarchicalMetrics`.

    Returns:
        0-d float64 tensor; NaN when there is no mistake.
    """
    _check_tree(tree)
    distance = _check_distance(distance)  # type: ignore[assignment]
    p, t = _check_pair(pred, target, tree.num_classes)
    total, mistakes = _severity_sums(p, t, tree, distance)
    return _ratio(total, mistakes)


def lca_mistake_height(pred: Tensor, target: Tensor, tree: Tree) -> Tensor:
    """``mistake_severity(pred, target, tree, distance="lca")``: the name this metric had in emdloss 0.1.0."""
    return mistake_severity(pred, target, tree, distance="lca")


def hierarchical_distance_topk(
    logits: Tensor, target: Tensor, tree: Tree, k: int = 5, distance: Distance = "lca"
) -> Tensor:
    """Average hierarchical distance@k (Bertinetto et al. 2020): mean over samples of the mean class distance
    of the ``k`` highest-scoring classes to the target.

    ``mean_i (1/k) sum_{j in topk(logits_i)} d(j, target_i)``, with ``d(t, t) = 0`` so a correct prediction
    counts 0 (their ``ilsvrc_dist_avg/k``: ``np.mean`` over the (batch, k) distances of the top-k, averaged over
    equal-sized batches). ``distance`` as in :func:`mistake_severity`: ``"lca"`` heights (theirs) or ``"path"``
    lengths. Spatial inputs as in :func:`topk_accuracy`.

    Returns:
        0-d float64 tensor; NaN for an empty batch.
    """
    _check_tree(tree)
    distance = _check_distance(distance)  # type: ignore[assignment]
    x, t = _check_logits(logits, target, k, tree.num_classes)
    if t.numel() == 0:
        return _nan(x.device)
    return _topk_distance_sum(x, t, tree, k, distance) / t.numel()


def emd_per_sample(probs: Tensor, target: Tensor, tree: Tree) -> Tensor:
    """(N,) exact EMD (rho = 1) between each row of ``probs`` (N, C) and its target.

    ``target`` is (N,) class indices or (N, C) distributions. With a hard target this equals
    ``sum_j probs_ij * D[j, target_i]`` (path lengths ``D``), the expected tree distance to the truth.
    Computed by :func:`emdloss.functional.emd` in O(nodes) per sample; no gradient.
    """
    from ..functional import emd

    _check_tree(tree)
    if isinstance(probs, Tensor) and probs.dtype.is_floating_point:
        _check_finite(probs, "probs", logits=False)  # on every device, as the other metrics
    with torch.no_grad():
        return emd(probs, target, tree, rho=1.0, from_logits=False, reduction="none")


def mean_absolute_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean ``|pred - target|`` in classes, for ordered classes (chains). 0-d float64; NaN for an empty batch."""
    p, t = _check_pair(pred, target, None)
    if p.numel() == 0:
        return _nan(p.device)
    return (p - t).abs().double().mean()


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def quadratic_weighted_kappa(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Cohen's kappa with quadratic weights ``w_ij = (i - j)^2 / (K - 1)^2`` for ``K = num_classes``.

    ``kappa = 1 - sum_ij w_ij O_ij / sum_ij w_ij E_ij`` with ``O`` the (K, K) confusion counts and
    ``E = outer(row sums, column sums) / N``. Equals ``sklearn.metrics.cohen_kappa_score(target, pred,
    weights="quadratic")`` (symmetric in its two arguments). 0-d float64; NaN when the denominator is 0 (e.g.
    all samples in one class).
    """
    _check_num_classes(num_classes)
    p, t = _check_pair(pred, target, num_classes)
    return _kappa_from_confusion(_confusion(p, t, num_classes))
