"""The contract every backend fulfils: per-row tree-EMD losses of a normalised :class:`~emdloss._inputs.Batch`.

A backend computes, for each row m of ``batch.x`` with ``p = softmax(x_m)`` (or ``x_m``) and target ``q``::

    loss_m = sum_e w_e |p(below e) - q(below e)|^rho          (0 for rows whose target is ignore_index)

as a differentiable (M,) tensor in ``batch.x``'s dtype. Its autograd Function returns, in backward, the
gradient already scaled by the incoming (M,) gradient; ignored rows get gradient 0. Everything else (input
checks, ``ignore_index`` bookkeeping, the reduction, the finite-loss check) happens once, outside, for every
backend alike: see docs/architecture.md. A backend may also compute the reduced loss in one step
(:meth:`Backend.loss`; the fused CPU backend does, sparing small batches two autograd nodes), with the same
value, gradient and errors as :func:`emdloss._reduction.reduce_rows` over its rows.
"""

from __future__ import annotations

import abc

import numpy as np
from torch import Tensor

from .._inputs import Batch
from .._reduction import reduce_rows
from ..tree import Tree


class BackendWarning(RuntimeWarning):
    """A backend, or a part of one, cannot run on this machine and something slower but equal takes its place
    (filter it with ``warnings.filterwarnings("ignore", category=emdloss.backends.BackendWarning)``)."""


class BackendUnusable(RuntimeError):
    """Raised by a backend that finds, while running, that it cannot work on this machine (a kernel failed to
    compile, say). It has warned and marked itself unavailable; with ``backend="auto"`` the registry then
    runs the call on the next backend."""


class Backend(abc.ABC):
    """One way to compute the loss. Subclass it in one module and add an instance to the registry
    (:mod:`emdloss.backends`)."""

    #: The name users pass as ``backend=...`` and ``EMDLOSS_BACKEND``.
    name: str

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """None if the backend can run on this machine (its imports work), else why not, naming the fix."""

    @abc.abstractmethod
    def cannot_run(self, batch: Batch) -> str | None:
        """None if the backend can compute this batch (device, dtype, autograd and tracing needs), else why."""

    def auto_skips(self, batch: Batch) -> str | None:
        """Why ``backend="auto"`` passes over this backend for a batch it could run (None: it does not)."""
        return None

    @abc.abstractmethod
    def row_losses(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        """(M,) per-row losses in ``batch.x``'s dtype, differentiable as the module docstring says."""

    def loss(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        """The loss after ``batch.reduction``: :func:`~emdloss._reduction.reduce_rows` of :meth:`row_losses`
        unless the backend fuses the reduction."""
        return reduce_rows(self.row_losses(batch, tree, rho), batch)


def loss_weights(tree: Tree) -> np.ndarray:
    """(num_nodes,) float64: the length of the edge from each node to its parent as the loss weighs it, which is
    ``tree.weights`` except 0 on the edges with every class below them (and at the root).

    Such an edge carries the flow ``sum(p) - sum(q)``, exactly 0 for distributions; computed, it is rounding
    error, which a long edge above the classes (a heavy root edge, a chain's far end) would multiply into the
    loss. Cached on the tree (do not modify it); every backend uses it, so they agree on these edges exactly.
    """

    def build() -> np.ndarray:
        start = tree.position  # node -> its DFS position; subtree_end is indexed by position
        below = np.searchsorted(np.sort(start[tree.classes]), [start, tree.subtree_end[start]])
        spans_all = (below[1] - below[0]) == tree.num_classes
        weights = np.where(spans_all, 0.0, tree.weights).astype(np.float64)
        weights[tree.root] = 0.0
        return weights

    return tree.cached("loss_weights", build)


def loss_weight_sum(tree: Tree) -> float:
    """The sum of :func:`loss_weights`: a bound on any row's loss (flows are at most 1 in magnitude), cached."""
    return tree.cached("loss_weight_sum", lambda: float(loss_weights(tree).sum()))
