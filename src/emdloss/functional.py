"""Functional losses: tensors in, tensors out.

A call travels: :func:`emd` -> input normalisation (:mod:`emdloss._inputs`) -> the backend registry
(:mod:`emdloss.backends`) -> one backend's per-row losses -> the reduction (:mod:`emdloss._reduction`).

Shapes follow ``torch.nn.functional.cross_entropy``: ``input`` is (N, C) or (N, C, d1, ..., dk) and
``target`` holds class indices (N) / (N, d1, ..., dk) or a distribution of ``input``'s shape.
"""

from __future__ import annotations

from torch import Tensor

from . import _inputs, backends
from ._reduction import reduce_rows
from .backends.reference import differentiable_flows
from .sinkhorn import sinkhorn
from .tree import Tree

__all__ = ["emd", "flows", "sinkhorn"]


def emd(
    input: Tensor,
    target: Tensor,
    tree: Tree,
    *,
    rho: float = 1.0,
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    validate: bool | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Earth Mover's Distance on a tree between predicted and target distributions over classes.

    For each sample, with ``p = softmax(input, dim=1)`` (or ``input`` itself if not ``from_logits``)
    and ``q`` the target distribution (one-hot for class indices)::

        loss = sum_e w_e * |f_e| ** rho,   f_e = p(subtree below e) - q(subtree below e)

    With ``rho = 1`` this is exactly the EMD (Wasserstein-1) under the tree metric; ``rho = 2`` is the
    relaxed form whose gradient shrinks as p approaches q. Cost O(num_nodes) per sample.

    Args:
        input: (N, C) or (N, C, d1, ..., dk) float logits, or probabilities if ``from_logits=False``.
        target: (N,) / (N, d1, ..., dk) integer class indices, or soft labels of ``input``'s shape.
        tree: the class hierarchy; ``tree.num_classes == C``.
        rho: exponent >= 1 on the flows.
        from_logits: apply a softmax over dim 1 first.
        reduction: "none" | "mean" | "sum". "mean" averages over samples whose target is not ignored.
        ignore_index: class index whose samples contribute nothing (hard targets only).
        validate: read values to check them (class range, finite logits, distributions). Default None:
            on for CPU tensors, off elsewhere (the checks would synchronise the device).
        backend: "auto" (``$EMDLOSS_BACKEND`` if set, else the fused numba kernels on the CPU and torch ops
            elsewhere), or a registered name: "numba", "torch" (see :mod:`emdloss.backends`).

    Returns:
        A scalar, or (N, d1, ..., dk) with ``reduction="none"``, in ``input``'s dtype.
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
    rho = _inputs.check_rho(rho)
    backends.check_name(backend)
    batch = _inputs.normalise(
        input, target, tree.num_classes, from_logits=from_logits, ignore_index=ignore_index, validate=validate,
        reduction=reduction,
    )  # fmt: skip
    return reduce_rows(backends.row_losses(backend, batch, tree, rho), batch)


def flows(p: Tensor, q: Tensor, tree: Tree) -> Tensor:
    """Per-edge flows ``f_e = p(below e) - q(below e)``, shape (N, E), for analysis and plotting.

    Args:
        p, q: (N, C) or (C,) distributions over the tree's classes (any real values are accepted).
    Returns:
        (N, E) (or (E,) for 1-D input) in ``p``'s dtype; column j is the edge from node
        ``tree.edge_nodes[j]`` to its parent. Positive flow means p has surplus below the edge, which
        moves up across it. ``emd`` with rho = 1 equals ``(flows.abs() * weights).sum(-1)`` with
        ``weights = tree.weights[tree.edge_nodes]``. Differentiable.
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
    if not isinstance(p, Tensor) or not isinstance(q, Tensor):
        raise TypeError("p and q must be torch tensors")
    if p.shape != q.shape or p.dim() not in (1, 2) or p.shape[-1] != tree.num_classes:
        raise ValueError(
            f"p and q must both have shape (N, {tree.num_classes}) or ({tree.num_classes},), "
            f"got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    if not p.dtype.is_floating_point or not q.dtype.is_floating_point:
        raise TypeError(f"p and q must be floating tensors, got {p.dtype} and {q.dtype}")
    squeeze = p.dim() == 1
    f = differentiable_flows((p - q).reshape(-1, tree.num_classes), tree).to(p.dtype)
    return f[0] if squeeze else f
