"""torchmetrics ``Metric`` classes for the metrics of :mod:`emdloss.metrics.functional` (``emdloss[metrics]``).

Every class keeps float64 sums (and counts, or a confusion matrix) registered with
``add_state(..., dist_reduce_fx="sum")``: torchmetrics adds them across processes before ``compute`` under DDP,
so every rank returns the metric of the global data, and ``merge_state`` combines two objects' states the same
way. ``compute`` divides the sums, so the value over several batches equals the function on their
concatenation. States are not persistent: they do not enter a model's ``state_dict``.

Imported by :mod:`emdloss.metrics` only when one of these classes is first used; importing this module without
torchmetrics raises :class:`~emdloss._optional.MissingOptionalDependency` naming ``pip install 'emdloss[metrics]'``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._optional import require
from ..tree import Tree
from . import functional as F

require("torchmetrics", "metrics", "the Metric classes of emdloss.metrics")

from torchmetrics import Metric, MetricCollection  # noqa: E402  (after the install hint above)

__all__ = [
    "EarthMoversDistance",
    "HierarchicalDistanceAtK",
    "HierarchicalMetrics",
    "MistakeSeverity",
    "OrdinalMAE",
    "QuadraticWeightedKappa",
    "SampleCount",
    "TopKAccuracy",
]


def _zero() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


def _check_ignore_index(ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


class _SumsMetric(Metric):
    """Common parts: float64 sum states, ``ignore_index``, input flattening and the device check."""

    is_differentiable = False
    full_state_update = False  # the states are sums: forward() may compute the batch value alone and add it

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = _check_ignore_index(ignore_index)

    def _sum_state(self, *names: str) -> None:
        for name in names:
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")

    def _same_device(self, x: Tensor) -> None:
        # torchmetrics states do not follow the inputs: say what to do instead of a raw device-mismatch error
        if x.device != self.device:
            raise ValueError(
                f"{type(self).__name__} is on {self.device} but the inputs are on {x.device}: move the metric "
                f"with .to({str(x.device)!r}) (a LightningModule attribute is moved for you)"
            )

    def _scores(self, preds: Tensor, target: Tensor, what: str = "preds", logits: bool = True) -> tuple[Tensor, Tensor]:
        """Scores (N, C[, d...]) and targets (N[, d...]) -> kept rows (M, C) and targets (M,)."""
        x, t = F._rows(preds, target, what)
        keep = t != self.ignore_index
        x, t = x[keep], t[keep]
        F._check_finite(x, what, logits)
        self._same_device(x)
        return x, t

    def _labels(self, preds: Tensor, target: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor]:
        """Predicted class indices with ``target``'s shape, or scores (N, C[, d...]) whose top-1 is taken."""
        if isinstance(preds, Tensor) and preds.dtype.is_floating_point:
            x, t = self._scores(preds, target)
            if num_classes is not None and x.shape[1] != num_classes:
                raise ValueError(f"preds has {x.shape[1]} classes but {num_classes} are expected")
            p = x.topk(1, dim=1).indices[:, 0] if x.shape[0] else t  # top-1 as in TopKAccuracy(k=1)
        else:
            if isinstance(preds, Tensor) and isinstance(target, Tensor) and preds.shape != target.shape:
                raise ValueError(
                    f"preds must be class indices of target's shape {tuple(target.shape)} or scores (N, C, ...), "
                    f"got {tuple(preds.shape)}"
                )
            p, t = F._check_pair(preds, target, None)
            keep = t != self.ignore_index
            p, t = p[keep], t[keep]
            self._same_device(p)
        p, t = F._check_pair(p, t, num_classes)
        return p, t


class _TreeMetric(_SumsMetric):
    def __init__(self, tree: Tree, ignore_index: int = -100, **kwargs: Any) -> None:
        F._check_tree(tree)
        super().__init__(ignore_index, **kwargs)
        self.tree = tree


class SampleCount(_SumsMetric):
    """Number of samples seen (targets other than ``ignore_index``), over batches and processes (float64)."""

    higher_is_better = None
    count: Tensor

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(ignore_index, **kwargs)
        self._sum_state("count")

    def update(self, preds: Tensor, target: Tensor) -> None:
        t = F._check_indices(target, "target")
        self._same_device(t)
        self.count += (t != self.ignore_index).sum().double()

    def compute(self) -> Tensor:
        return self.count.clone()


class TopKAccuracy(_SumsMetric):
    """Top-k accuracy: ``mean_i 1[target_i in topk(preds_i)]`` (:func:`~emdloss.metrics.topk_accuracy`).

    ``update(preds, target)``: scores (N, C) or (N, C, d1, ..., dk) (logits or probabilities) and class indices
    (N,) or (N, d1, ..., dk); targets equal to ``ignore_index`` are skipped. States: ``correct``, ``total``.
    """

    higher_is_better = True
    correct: Tensor
    total: Tensor

    def __init__(self, k: int = 1, ignore_index: int = -100, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        super().__init__(ignore_index, **kwargs)
        self.k = k
        self._sum_state("correct", "total")

    def update(self, preds: Tensor, target: Tensor) -> None:
        x, t = self._scores(preds, target)
        F._check_rows(x, t, self.k, None, "preds")
        self.correct += F._topk_correct(x, t, self.k).sum().double()
        self.total += t.numel()

    def compute(self) -> Tensor:
        return F._ratio(self.correct, self.total)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class MistakeSeverity(_TreeMetric):
    """Mistake severity (Bertinetto et al. 2020): mean class distance of the top-1 prediction to the target over
    the mistakes (:func:`~emdloss.metrics.mistake_severity`).

    ``distance="lca"`` (theirs): LCA height ``H - depth_hops(LCA)``; ``"path"``: weighted path length.
    ``update(preds, target)``: predicted class indices of ``target``'s shape, or scores (N, C, ...) whose top-1
    is taken. States: ``total`` (sum of distances over the mistakes), ``mistakes``. NaN when there was no mistake.
    """

    higher_is_better = False
    total: Tensor
    mistakes: Tensor

    def __init__(self, tree: Tree, distance: F.Distance = "lca", ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(tree, ignore_index, **kwargs)
        self.distance = F._check_distance(distance)
        self._sum_state("total", "mistakes")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = self._labels(preds, target, self.tree.num_classes)
        total, mistakes = F._severity_sums(p, t, self.tree, self.distance)
        self.total += total
        self.mistakes += mistakes

    def compute(self) -> Tensor:
        return F._ratio(self.total, self.mistakes)

    def extra_repr(self) -> str:
        return f"{self.tree!r}, distance={self.distance!r}"


class HierarchicalDistanceAtK(_TreeMetric):
    """Average hierarchical distance@k (Bertinetto et al. 2020): mean over samples of the mean class distance of
    the k highest-scoring classes to the target, correct ones counting 0
    (:func:`~emdloss.metrics.hierarchical_distance_topk`). ``distance`` as in :class:`MistakeSeverity`.
    States: ``total``, ``count``.
    """

    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(
        self, tree: Tree, k: int = 5, distance: F.Distance = "lca", ignore_index: int = -100, **kwargs: Any
    ) -> None:
        super().__init__(tree, ignore_index, **kwargs)
        self.k = F._check_k(k, tree.num_classes)
        self.distance = F._check_distance(distance)
        self._sum_state("total", "count")

    def update(self, preds: Tensor, target: Tensor) -> None:
        x, t = self._scores(preds, target)
        F._check_rows(x, t, self.k, self.tree.num_classes, "preds")
        self.total += F._topk_distance_sum(x, t, self.tree, self.k, self.distance)
        self.count += t.numel()

    def compute(self) -> Tensor:
        return F._ratio(self.total, self.count)

    def extra_repr(self) -> str:
        return f"{self.tree!r}, k={self.k}, distance={self.distance!r}"


class EarthMoversDistance(_TreeMetric):
    """Mean exact EMD (rho = 1, path lengths) between the predicted distribution and the target
    (:func:`~emdloss.metrics.emd_per_sample`): with a class-index target, the expected tree distance to it.

    ``update(preds, target)``: logits (softmax is applied) or, with ``from_logits=False``, probabilities, (N, C)
    or (N, C, d1, ..., dk); ``target`` class indices (``ignore_index`` skipped). States: ``total``, ``count``.
    """

    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(self, tree: Tree, from_logits: bool = True, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(tree, ignore_index, **kwargs)
        self.from_logits = bool(from_logits)
        self._sum_state("total", "count")

    def update(self, preds: Tensor, target: Tensor) -> None:
        what = "preds" if self.from_logits else "probabilities (from_logits=False)"
        x, t = self._scores(preds, target, what, logits=self.from_logits)
        F._check_rows(x, t, 1, self.tree.num_classes, what, logits=self.from_logits)
        if t.numel() == 0:
            return
        probs = torch.softmax(x.double(), dim=1) if self.from_logits else x.double()
        self.total += F.emd_per_sample(probs, t, self.tree).double().sum()
        self.count += t.numel()

    def compute(self) -> Tensor:
        return F._ratio(self.total, self.count)

    def extra_repr(self) -> str:
        return f"{self.tree!r}, from_logits={self.from_logits}"


class OrdinalMAE(_SumsMetric):
    """Mean absolute error in classes for ordered classes, ``mean_i |pred_i - target_i|``
    (:func:`~emdloss.metrics.mean_absolute_error`). ``update(preds, target)``: class indices of ``target``'s
    shape, or scores (N, C, ...) whose top-1 is taken. States: ``total``, ``count``.
    """

    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(self, num_classes: int | None = None, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(ignore_index, **kwargs)
        self.num_classes = None if num_classes is None else F._check_num_classes(num_classes)
        self._sum_state("total", "count")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = self._labels(preds, target, self.num_classes)
        self.total += (p - t).abs().double().sum()
        self.count += t.numel()

    def compute(self) -> Tensor:
        return F._ratio(self.total, self.count)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class QuadraticWeightedKappa(_SumsMetric):
    """Cohen's kappa with quadratic weights over ``num_classes`` ordered classes
    (:func:`~emdloss.metrics.quadratic_weighted_kappa`). State: the (K, K) float64 confusion matrix ``confmat``
    (rows = target, columns = prediction), summed across processes. ``update`` as :class:`OrdinalMAE`.
    """

    higher_is_better = True
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(ignore_index, **kwargs)
        self.num_classes = F._check_num_classes(num_classes)
        k = self.num_classes
        self.add_state("confmat", default=torch.zeros((k, k), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = self._labels(preds, target, self.num_classes)
        self.confmat += F._confusion(p, t, self.num_classes)

    def compute(self) -> Tensor:
        return F._kappa_from_confusion(self.confmat)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class HierarchicalMetrics(MetricCollection):
    """The hierarchical metrics of one task as a torchmetrics ``MetricCollection``.

    ``update(logits, target)`` feeds every metric; ``compute()`` returns a dict of 0-d float64 tensors (synced
    across processes under DDP by torchmetrics: call it on every rank); ``reset()`` clears them. In Lightning,
    keep it as a module attribute (it moves with the model) and log it with ``self.log_dict(metrics)``. Its
    states are not persistent, so it adds nothing to the model's ``state_dict``.

    Keys (``d`` = LCA height for ``*_lca``, weighted path length for ``*_path``):

    ========================  ==============================================================================
    ``count``                 samples seen (targets other than ``ignore_index``)
    ``top1``, ``top{k}``      top-1 and top-k accuracy (``top{k}`` only when ``k > 1``)
    ``severity_lca``          mistake severity of Bertinetto et al.: mean LCA height over the top-1 mistakes
    ``severity_path``         mean path length over the top-1 mistakes
    ``hdist_lca@{k}``         average hierarchical distance@k of Bertinetto et al. (LCA height)
    ``hdist_path@{k}``        the same with path lengths
    ``emd``                   mean exact EMD (rho = 1) of the predicted distribution to the target
    ``mae``, ``qwk``          with ``confusion=True`` (ordered classes): MAE in classes, quadratic kappa
    ========================  ==============================================================================

    Args:
        tree: the class hierarchy (or ``Tree.chain(K)`` for ordered classes).
        k: the k of top-k accuracy and of the hierarchical distance@k.
        confusion: also compute ``mae`` and ``qwk`` (adds a (C, C) confusion matrix to the state).
        ignore_index: targets equal to this are skipped.
        from_logits: ``update`` receives logits (softmax for the EMD); False for probabilities.
        prefix, postfix: added to every key, as for ``MetricCollection`` (e.g. ``prefix="val/"``).
    """

    def __init__(
        self,
        tree: Tree,
        k: int = 5,
        confusion: bool = False,
        ignore_index: int = -100,
        from_logits: bool = True,
        prefix: str | None = None,
        postfix: str | None = None,
    ) -> None:
        F._check_tree(tree)
        F._check_k(k, tree.num_classes)
        ii = _check_ignore_index(ignore_index)
        metrics: dict[str, Metric | MetricCollection] = {
            "count": SampleCount(ii),
            "top1": TopKAccuracy(1, ii),
        }
        if k > 1:
            metrics[f"top{k}"] = TopKAccuracy(k, ii)
        metrics["severity_lca"] = MistakeSeverity(tree, "lca", ii)
        metrics["severity_path"] = MistakeSeverity(tree, "path", ii)
        metrics[f"hdist_lca@{k}"] = HierarchicalDistanceAtK(tree, k, "lca", ii)
        metrics[f"hdist_path@{k}"] = HierarchicalDistanceAtK(tree, k, "path", ii)
        metrics["emd"] = EarthMoversDistance(tree, from_logits, ii)
        if confusion:
            metrics["mae"] = OrdinalMAE(tree.num_classes, ii)
            metrics["qwk"] = QuadraticWeightedKappa(tree.num_classes, ii)
        # compute groups would compare states after the first update to share them; these metrics share none
        super().__init__(metrics, prefix=prefix, postfix=postfix, compute_groups=False)
        self.tree, self.k, self.confusion = tree, k, bool(confusion)
        self.ignore_index, self.from_logits = ii, bool(from_logits)

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Add a batch: ``logits`` (N, C) or (N, C, d1, ..., dk) (probabilities if ``from_logits=False``),
        ``target`` (N,) or (N, d1, ..., dk) class indices. Every position of a spatial input is one sample.

        The batch is checked once, before any metric is updated, so a rejected batch adds nothing to any."""
        what = "logits" if self.from_logits else "probabilities (from_logits=False)"
        x, t = F._rows(logits, target, what)
        keep = t != self.ignore_index
        F._check_rows(x[keep], t[keep], self.k, self.tree.num_classes, what, logits=self.from_logits)
        super().update(logits, target)

    def extra_repr(self) -> str:
        return (
            f"{self.tree!r}, k={self.k}, confusion={self.confusion}, ignore_index={self.ignore_index}, "
            f"from_logits={self.from_logits}"
        )
