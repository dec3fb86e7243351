"""Hierarchy-aware evaluation metrics (Bertinetto et al., "Making Better Mistakes", CVPR 2020) and ordinal ones.

Functions (:mod:`emdloss.metrics.functional`, torch only) return 0-d float64 tensors:
:func:`topk_accuracy`, :func:`mistake_severity`, :func:`hierarchical_distance_topk`, :func:`emd_per_sample`
((N,)), :func:`mean_absolute_error`, :func:`quadratic_weighted_kappa`. The hierarchical ones take
``distance="lca"`` (height of the lowest common ancestor, the paper's; default) or ``"path"`` (weighted path
length).

torchmetrics ``Metric`` classes (optional extra ``pip install 'emdloss[metrics]'``, imported on first use so
``import emdloss.metrics`` does not import torchmetrics): :class:`TopKAccuracy`, :class:`MistakeSeverity`,
:class:`HierarchicalDistanceAtK`, :class:`EarthMoversDistance`, :class:`OrdinalMAE`,
:class:`QuadraticWeightedKappa`, :class:`SampleCount`, and :class:`HierarchicalMetrics`, a ``MetricCollection``
of them for one task. They sync across DDP processes through torchmetrics. See docs/metrics.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from .functional import (
    DISTANCES,
    class_distance_matrix,
    emd_per_sample,
    hierarchical_distance_topk,
    lca_mistake_height,
    mean_absolute_error,
    mistake_severity,
    quadratic_weighted_kappa,
    topk_accuracy,
)

_TORCHMETRICS_CLASSES = (
    "EarthMoversDistance",
    "HierarchicalDistanceAtK",
    "HierarchicalMetrics",
    "MistakeSeverity",
    "OrdinalMAE",
    "QuadraticWeightedKappa",
    "SampleCount",
    "TopKAccuracy",
)

__all__ = [
    "DISTANCES",
    "class_distance_matrix",
    "emd_per_sample",
    "hierarchical_distance_topk",
    "lca_mistake_height",
    "mean_absolute_error",
    "mistake_severity",
    "quadratic_weighted_kappa",
    "topk_accuracy",
    *_TORCHMETRICS_CLASSES,
]


def __getattr__(name: str) -> Any:
    # PEP 562: the torchmetrics classes load torchmetrics (and say how to install it) only when first asked for
    if name in _TORCHMETRICS_CLASSES:
        return getattr(importlib.import_module(f"{__name__}._torchmetrics"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCHMETRICS_CLASSES))
