"""Hierarchy-aware evaluation metrics (Bertinetto et al., "Making Better Mistakes", CVPR 2020) and ordinal ones.

All functions take tensors and return Python floats (or a tensor for :func:`emd_per_sample`):

- :func:`topk_accuracy` -- fraction of samples whose true class is among the k highest logits.
- :func:`mistake_severity` -- mean tree distance ``D[pred, target]`` over the *mistakes* (pred != target).
- :func:`lca_mistake_height` -- mean height of the lowest common ancestor over the mistakes, where the height
  of a node is ``H - depth_hops(node)`` with ``H`` the largest depth (in edges) of any class. On trees whose
  classes are all leaves at one level (ImageNet-H of Bertinetto et al.) this is the number of levels one has
  to climb from a leaf to reach the LCA, as that paper reports it; it ignores edge weights.
- :func:`hierarchical_distance_topk` -- mean tree distance of each of the top-k predictions to the truth,
  averaged over the k predictions and the samples (correct predictions count with distance 0).
- :func:`emd_per_sample` -- exact EMD (rho = 1) of each predicted distribution to its one-hot target.
- :func:`mean_absolute_error`, :func:`quadratic_weighted_kappa` -- for ordered classes (chains).

:class:`HierarchicalMetrics` accumulates all of these over batches and, when ``torch.distributed`` is
initialised, sums its state across processes in :meth:`HierarchicalMetrics.compute`, so the result equals
the single-process value on the global data.

Distance and LCA matrices are cached on the tree (:meth:`~emdloss.Tree.cached`), per device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .tree import Tree

__all__ = [
    "HierarchicalMetrics",
    "emd_per_sample",
    "hierarchical_distance_topk",
    "lca_mistake_height",
    "mean_absolute_error",
    "mistake_severity",
    "quadratic_weighted_kappa",
    "topk_accuracy",
]


# ---------------------------------------------------------------------- cached tree matrices


def _distance_tensor(tree: Tree, device: torch.device) -> Tensor:
    """(C, C) float64 tree distances between classes on ``device`` (cached on the tree)."""
    return tree.cached(
        ("metrics.dist", str(device)),
        lambda: torch.from_numpy(np.array(tree.distance_matrix(), dtype=np.float64)).to(device),
    )


def _lca_height_tensor(tree: Tree, device: torch.device) -> Tensor:
    """(C, C) float64 height (in hops) of the LCA of two classes: ``max class depth - depth(LCA)``."""

    def build() -> Tensor:
        lca = tree.lca_depth(hops=True)
        top = float(np.max(np.diag(lca)))  # diag = hop depth of each class
        return torch.from_numpy(np.ascontiguousarray(top - lca)).to(device)

    return tree.cached(("metrics.lca_height", str(device)), build)


# ---------------------------------------------------------------------- argument checks


def _check_tree(tree: Tree) -> None:
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")


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
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
        raise ValueError(f"k must be an integer in [1, {c}], got {k!r}")
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


# ---------------------------------------------------------------------- functional metrics


def topk_accuracy(logits: Tensor, target: Tensor, k: int = 1) -> float:
    """Fraction of rows of ``logits`` (N, C) whose ``target`` (N,) is among the ``k`` largest entries.

    Spatial inputs (N, C, d1, ..., dk) with targets (N, d1, ..., dk) count every position. Ties are broken by
    ``torch.topk`` (lower index first on the CPU). NaN for an empty batch; NaN, +inf or a row of only -inf in
    ``logits`` is a ValueError.
    """
    logits, t = _check_logits(logits, target, k)
    if t.numel() == 0:
        return math.nan
    top = logits.topk(k, dim=1).indices
    return float((top == t[:, None]).any(dim=1).double().mean())


def _mean_over_mistakes(
    pred: Tensor, target: Tensor, tree: Tree, pair_matrix: Callable[[Tree, torch.device], Tensor]
) -> float:
    """Mean of ``pair_matrix(tree)[pred_i, target_i]`` over the samples with ``pred_i != target_i`` (NaN if none)."""
    _check_tree(tree)
    p, t = _check_pair(pred, target, tree.num_classes)
    wrong = p != t
    if not bool(wrong.any()):
        return math.nan
    return float(pair_matrix(tree, p.device)[p[wrong], t[wrong]].mean())


def mistake_severity(pred: Tensor, target: Tensor, tree: Tree) -> float:
    """Mean tree distance ``D[pred_i, target_i]`` over the samples with ``pred_i != target_i``.

    Args:
        pred, target: (N,) class indices. Returns NaN when there is no mistake.
    """
    return _mean_over_mistakes(pred, target, tree, _distance_tensor)


def lca_mistake_height(pred: Tensor, target: Tensor, tree: Tree) -> float:
    """Mean height of ``LCA(pred_i, target_i)`` over the mistakes, in hops from the deepest class level.

    height(v) = max_k depth_hops(class_k) - depth_hops(v), as in Bertinetto et al. (2020), whose
    ImageNet/iNaturalist trees have every class at the deepest level; edge weights are ignored. NaN when
    there is no mistake.
    """
    return _mean_over_mistakes(pred, target, tree, _lca_height_tensor)


def hierarchical_distance_topk(logits: Tensor, target: Tensor, tree: Tree, k: int = 5) -> float:
    """Mean over samples and over the ``k`` highest-scoring classes of their tree distance to the target.

    ``mean_i (1/k) sum_{j in topk(logits_i)} D[j, target_i]`` (Bertinetto et al.'s "average hierarchical
    distance@k"); a correct prediction contributes 0. Spatial inputs as in :func:`topk_accuracy`. NaN for an
    empty batch.
    """
    _check_tree(tree)
    logits, t = _check_logits(logits, target, k, tree.num_classes)
    if t.numel() == 0:
        return math.nan
    top = logits.topk(k, dim=1).indices
    d = _distance_tensor(tree, logits.device)
    return float(d[top, t[:, None]].mean())


def emd_per_sample(probs: Tensor, target: Tensor, tree: Tree) -> Tensor:
    """(N,) exact EMD (rho = 1) between each row of ``probs`` (N, C) and the one-hot ``target`` (N,).

    With a hard target this equals ``sum_j probs_ij * D[j, target_i]``, the expected tree distance to
    the truth. Computed by :func:`emdloss.functional.emd` in O(nodes) per sample; no gradient.
    """
    from .functional import emd

    _check_tree(tree)
    if isinstance(probs, Tensor) and probs.dtype.is_floating_point:
        _check_finite(probs, "probs", logits=False)  # on every device, as the other metrics
    with torch.no_grad():
        return emd(probs, target, tree, rho=1.0, from_logits=False, reduction="none")


def mean_absolute_error(pred: Tensor, target: Tensor) -> float:
    """Mean ``|pred - target|`` in classes, for ordered classes (chains). NaN for an empty batch."""
    p, t = _check_pair(pred, target, None)
    if p.numel() == 0:
        return math.nan
    return float((p - t).abs().double().mean())


def quadratic_weighted_kappa(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights ``w_ij = (i - j)^2 / (K - 1)^2`` for ``K = num_classes``.

    ``kappa = 1 - sum_ij w_ij O_ij / sum_ij w_ij E_ij`` with ``O`` the (K, K) confusion counts and
    ``E = outer(row sums, column sums) / N``. Equals ``sklearn.metrics.cohen_kappa_score(target, pred,
    weights="quadratic")`` (symmetric in its two arguments). NaN when the denominator is 0 (e.g. all
    samples in one class).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    p, t = _check_pair(pred, target, num_classes)
    conf = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return _kappa_from_confusion(conf.reshape(num_classes, num_classes).double())


def _kappa_from_confusion(conf: Tensor) -> float:
    k = conf.shape[0]
    n = conf.sum()
    if float(n) == 0 or k == 1:
        return math.nan
    idx = torch.arange(k, dtype=torch.float64, device=conf.device)
    w = (idx[:, None] - idx[None, :]).square() / (k - 1) ** 2
    expected = conf.sum(1)[:, None] * conf.sum(0)[None, :] / n
    den = float((w * expected).sum())
    if den == 0.0:
        return math.nan
    return 1.0 - float((w * conf).sum()) / den


# ---------------------------------------------------------------------- accumulator


class HierarchicalMetrics:
    """Accumulate hierarchical metrics over batches (and over DDP processes).

    State is a handful of float64 sums (and a (C, C) confusion matrix when ``confusion=True``, needed for
    the quadratic kappa of ordinal tasks). :meth:`compute` all-reduces a copy of the state when
    ``torch.distributed`` is initialised, so every process returns the metrics of the global data; the
    local state is untouched, so compute() may be called every epoch without double counting.

    Example::

        m = HierarchicalMetrics(tree, k=5)
        for x, y in loader:
            m.update(model(x), y)
        print(m.compute())   # {'top1': ..., 'top5': ..., 'mistake_severity': ..., ...}
        m.reset()

    Args:
        tree: the class hierarchy (or ``Tree.chain(K)`` for ordered classes).
        k: the k of top-k accuracy and of the hierarchical distance@k.
        confusion: also keep a confusion matrix (adds ``mae`` and ``qwk`` to the results).
        ignore_index: targets equal to this are skipped.
        from_logits: ``update`` receives logits (softmax is applied for the EMD); False for probabilities.
    """

    _SUMS = ("count", "top1", "topk", "mistakes", "severity", "lca_height", "hdist_k", "emd")

    def __init__(
        self, tree: Tree, k: int = 5, confusion: bool = False, ignore_index: int = -100, from_logits: bool = True
    ) -> None:
        _check_tree(tree)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= tree.num_classes:
            raise ValueError(f"k must be an integer in [1, {tree.num_classes}], got {k!r}")
        self.tree = tree
        self.k = k
        self.confusion = bool(confusion)
        self.ignore_index = int(ignore_index)
        self.from_logits = bool(from_logits)
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self._SUMS), dtype=torch.float64, device=self.device)
        c = self.tree.num_classes
        self.conf = torch.zeros((c, c), dtype=torch.float64, device=self.device) if self.confusion else None

    def to(self, device: torch.device | str) -> HierarchicalMetrics:
        self.device = torch.device(device)
        self.sums = self.sums.to(self.device)
        if self.conf is not None:
            self.conf = self.conf.to(self.device)
        return self

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: ``logits`` (N, C) or (N, C, d1, ..., dk) (probabilities if ``from_logits=False``),
        ``target`` (N,) or (N, d1, ..., dk) class indices. Every position of a spatial input is one sample."""
        what = "logits" if self.from_logits else "probabilities (from_logits=False)"
        logits, t = _rows(logits, target, what)
        keep = t != self.ignore_index
        logits, t = logits[keep], t[keep]
        _check_rows(logits, t, self.k, self.tree.num_classes, what, logits=self.from_logits)
        if logits.device != self.device:
            self.to(logits.device)
        if t.numel() == 0:
            return
        d = _distance_tensor(self.tree, logits.device)
        h = _lca_height_tensor(self.tree, logits.device)
        top = logits.topk(self.k, dim=1).indices
        pred = top[:, 0]
        wrong = pred != t
        probs = torch.softmax(logits.double(), dim=1) if self.from_logits else logits.double()
        batch = torch.stack(
            [
                torch.tensor(float(t.numel()), dtype=torch.float64, device=self.device),
                (~wrong).double().sum(),
                (top == t[:, None]).any(1).double().sum(),
                wrong.double().sum(),
                d[pred, t][wrong].sum(),
                h[pred, t][wrong].sum(),
                d[top, t[:, None]].mean(1).sum(),
                emd_per_sample(probs, t, self.tree).double().sum(),
            ]
        )
        self.sums += batch
        if self.conf is not None:
            c = self.tree.num_classes
            self.conf += torch.bincount(t * c + pred, minlength=c * c).reshape(c, c).double()

    def _global_state(self) -> tuple[Tensor, Tensor | None]:
        sums = self.sums.clone()
        conf = self.conf.clone() if self.conf is not None else None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            if conf is not None:
                dist.all_reduce(conf)
        return sums, conf

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen (on every process, when distributed). NaN where undefined.

        When ``torch.distributed`` is initialised this is a collective (an all-reduce): call it on every
        process, as with any DDP metric.

        Keys: ``top1``, ``top{k}``, ``mistake_severity``, ``lca_mistake_height``, ``hdist@{k}``, ``emd``,
        ``count``, and with ``confusion=True`` also ``mae`` and ``qwk``.
        """
        sums, conf = self._global_state()
        s = dict(zip(self._SUMS, sums.tolist()))
        n, m = s["count"], s["mistakes"]

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else math.nan

        out = {
            "count": n,
            "top1": ratio(s["top1"], n),
            f"top{self.k}": ratio(s["topk"], n),
            "mistake_severity": ratio(s["severity"], m),
            "lca_mistake_height": ratio(s["lca_height"], m),
            f"hdist@{self.k}": ratio(s["hdist_k"], n),
            "emd": ratio(s["emd"], n),
        }
        if conf is not None:
            c = conf.shape[0]
            idx = torch.arange(c, dtype=torch.float64, device=conf.device)
            out["mae"] = ratio(float(((idx[:, None] - idx[None, :]).abs() * conf).sum()), n)
            out["qwk"] = _kappa_from_confusion(conf)
        return out
