"""Functional losses: tensors in, tensors out.

A call travels: :func:`emd` -> input normalisation (:mod:`emdloss._inputs`) -> (label smoothing, class weights)
-> the backend registry (:mod:`emdloss.backends`) -> one backend's per-row losses -> the reduction
(:mod:`emdloss._reduction`).

Shapes follow ``torch.nn.functional.cross_entropy``: ``input`` is (C,), (N, C) or (N, C, d1, ..., dk) and
``target`` holds class indices () / (N) / (N, d1, ..., dk) or a distribution of ``input``'s shape.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _inputs, backends
from ._reduction import reduce_rows
from .backends.reference import differentiable_flows
from .sinkhorn import sinkhorn
from .tree import Tree

__all__ = ["emd", "flows", "sinkhorn", "smoothing_distribution"]

SMOOTHINGS = ("uniform", "tree")


def emd(
    input: Tensor,
    target: Tensor,
    tree: Tree,
    *,
    rho: float = 1.0,
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    smoothing_scale: float | None = None,
    validate: bool | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Earth Mover's Distance on a tree between predicted and target distributions over classes.

    For each sample, with ``p = softmax(input)`` over the classes (or ``input`` itself if not ``from_logits``)
    and ``q`` the target distribution (one-hot for a class index, smoothed if ``label_smoothing > 0``)::

        loss = r * sum_e w_e * |f_e| ** rho,   f_e = p(subtree below e) - q(subtree below e)

    with ``r`` the sample's class weight (1 without ``weight``). With ``rho = 1`` the sum is exactly the EMD
    (Wasserstein-1) under the tree metric; ``rho = 2`` is the relaxed form whose gradient shrinks as p
    approaches q. Cost O(num_nodes) per sample.

    Class weights (``weight``, as in ``torch.nn.functional.cross_entropy``): a class-index target ``y`` gives
    ``r = weight[y]`` and ``"mean"`` divides the weighted sum by ``sum weight[y]`` over the samples that are not
    ``ignore_index``; a soft target ``q`` gives ``r = sum_c weight[c] q_c`` (the expected class weight of the
    target, before smoothing) and ``"mean"`` divides by the number of samples, as torch does for probability
    targets.

    Label smoothing (``label_smoothing = eps``) replaces the target by ``(1 - eps) q + eps s``:

    - ``smoothing="uniform"`` (``nn.CrossEntropyLoss``'s meaning): ``s_c = 1 / C``;
    - ``smoothing="tree"``: ``s = sum_y q_y K[y]`` with ``K[y, c] = exp(-d(y, c) / tau) / Z_y``, the tree
      distance ``d`` between classes and ``tau = smoothing_scale`` (default: the smallest distance between two
      distinct classes). Mass goes to the classes near the label (for a chain, a discrete Laplace profile
      around it), so the target stays cheap to reach under the EMD, unlike uniform mass, which the EMD
      charges for moving to the far classes. It needs the (C, C) tables ``d`` and ``K``
      (:func:`smoothing_distribution`; 8 C^2 bytes each, cached on the tree). ``torch.compile`` cannot trace
      their construction: call :func:`smoothing_distribution` once before compiling (:class:`EMDLoss` builds
      them when constructed).

    Args:
        input: (C,), (N, C) or (N, C, d1, ..., dk) float logits, or probabilities if ``from_logits=False``.
        target: () / (N,) / (N, d1, ..., dk) integer class indices, or soft labels of ``input``'s shape.
        tree: the class hierarchy; ``tree.num_classes == C``.
        rho: exponent >= 1 on the flows.
        from_logits: apply a softmax over the class dimension first.
        reduction: "none" | "mean" | "sum". "mean" averages over samples whose target is not ignored
            (weighted by ``weight``, see above).
        ignore_index: class index whose samples contribute nothing (hard targets only).
        weight: optional (C,) non-negative, finite floating class weights on ``input``'s device.
        label_smoothing: ``eps`` in [0, 1); 0 turns smoothing off.
        smoothing: "uniform" | "tree": the distribution mixed into the target.
        smoothing_scale: ``tau`` > 0 for ``smoothing="tree"``, in the tree's edge-length units.
        validate: read values to check them (class range, finite logits, distributions, weights). Default None:
            on for CPU tensors, off elsewhere (the checks would synchronise the device).
        backend: "auto" (``$EMDLOSS_BACKEND`` if set, else the fused numba kernels on the CPU and torch ops
            elsewhere), or a registered name: "numba", "torch" (see :mod:`emdloss.backends`).

    Returns:
        A scalar, or (N, d1, ..., dk) (() for (C,) input) with ``reduction="none"``, in ``input``'s dtype.
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
    rho, ignore_index, label_smoothing, smoothing, smoothing_scale = check_options(
        rho, reduction, ignore_index, label_smoothing, smoothing, smoothing_scale, validate, backend, from_logits
    )
    if isinstance(input, Tensor) and input.dim() == 0:
        raise ValueError(
            f"input must have shape (N, C), (N, C, d1, ..., dk) or, unbatched, (C,) with C = {tree.num_classes}, got shape ()"
        )
    if weight is None and label_smoothing == 0.0 and from_logits and reduction != "none":
        fast = backends.fast_loss(backend, input, target, tree, rho, reduction, ignore_index)
        if fast is not None:
            return fast
    unbatched = isinstance(input, Tensor) and input.dim() == 1
    if unbatched:
        input, target = _batch_of_one(input, target)
    batch = _inputs.normalise(
        input, target, tree.num_classes, from_logits=from_logits, ignore_index=ignore_index, validate=validate,
        reduction=reduction,
    )  # fmt: skip
    if weight is None and label_smoothing == 0.0:
        loss = backends.loss(backend, batch, tree, rho)
    else:
        if weight is not None:
            weight = check_weight(weight, tree.num_classes, values=batch.values_checked)
            if weight.device != batch.x.device:
                raise ValueError(
                    f"weight is on {weight.device} but input is on {batch.x.device}; move it (criterion.to(device))"
                )
        labels = batch.labels
        if labels is not None and labels.device.type == "cpu" and not _inputs.tracing() and not batch.values_checked:
            # indexing by class below: an index out of range would be a bare IndexError; name it (one pass on M ints)
            _inputs.check_labels(labels.numpy(), tree.num_classes, batch.ignore_index)
        rows = batch
        if label_smoothing > 0.0:
            rows = dataclasses.replace(
                batch, labels=None, keep=None, soft=_smoothed_target(batch, tree, label_smoothing, smoothing, smoothing_scale)
            )  # fmt: skip
        weights, weight_sum = _row_weights(batch, weight)
        loss = reduce_rows(backends.row_losses(backend, rows, tree, rho), batch, weights, weight_sum)
    return loss.reshape(()) if unbatched and reduction == "none" else loss


def smoothing_distribution(tree: Tree, smoothing: str = "tree", scale: float | None = None) -> Tensor:
    r"""(C, C) float64: row ``y`` is the distribution ``s`` that label smoothing mixes into a one-hot target ``y``.

    ``"uniform"``: every entry ``1 / C``. ``"tree"``: ``K[y, c] = exp(-d(y, c) / tau) / sum_c' exp(-d(y, c') / tau)``
    with ``d`` the tree distance between classes (:meth:`Tree.distance_matrix`) and ``tau = scale``, by default
    the smallest positive distance between two classes (1 if there is none), so the nearest other classes get
    ``1/e`` of the label's own share. A smoothed target is then ``(1 - eps) onehot(y) + eps K[y]``
    (see :func:`emd`). O(C^2) time and memory; the "tree" table is cached on the tree, per ``scale``.
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
    smoothing, scale = _check_smoothing(smoothing, scale)
    if smoothing == "uniform":
        return torch.full((tree.num_classes,) * 2, 1.0 / tree.num_classes, dtype=torch.float64)
    return torch.from_numpy(_tree_kernel(tree, scale).copy())


# ---------------------------------------------------------------------- argument checks


def check_options(
    rho: Any,
    reduction: Any,
    ignore_index: Any,
    label_smoothing: Any,
    smoothing: Any,
    smoothing_scale: Any,
    validate: Any,
    backend: Any,
    from_logits: Any = True,
) -> tuple[float, int, float, str, float | None]:
    """Check the loss's settings (cheap, no tensor read) and return them normalised:
    ``(rho, ignore_index, label_smoothing, smoothing, smoothing_scale)``. Each error names its argument."""
    rho = _inputs.check_rho(rho)
    _inputs.check_reduction(reduction)
    if not isinstance(from_logits, (bool, np.bool_)):
        raise TypeError(f"from_logits must be True or False, got {from_logits!r}")
    if isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an integer class index, got {ignore_index!r}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer class index, got {ignore_index!r}") from None
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (class indices are int64), got {ignore_index}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.floating, np.integer)):
        raise TypeError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1) (0: off), got {label_smoothing!r}")
    smoothing, smoothing_scale = _check_smoothing(smoothing, smoothing_scale)
    if validate is not None and not isinstance(validate, (bool, np.bool_)):
        raise TypeError(f"validate must be True, False or None (None: on for CPU tensors), got {validate!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto' or one of {backends.names()}), got {backend!r}")
    backends.check_name(backend)
    return rho, ignore_index, label_smoothing, smoothing, smoothing_scale


def _check_smoothing(smoothing: Any, scale: Any) -> tuple[str, float | None]:
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if scale is None:
        return smoothing, None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"smoothing_scale must be a positive number or None, got {scale!r}")
    if not (0.0 < float(scale) < math.inf):
        raise ValueError(f"smoothing_scale must be a finite number > 0 (tree distance units), got {scale!r}")
    return smoothing, float(scale)


def check_weight(weight: Any, num_classes: int, values: bool = True) -> Tensor:
    """``weight`` as a (C,) floating tensor: a tensor is kept as it is (device and dtype), a sequence of numbers
    becomes a tensor of the default dtype. With ``values``, its entries must be finite and >= 0 (reading them)."""
    if isinstance(weight, Tensor):
        tensor = weight
    else:
        if isinstance(weight, (str, bytes)) or not isinstance(weight, (Sequence, np.ndarray)):
            raise TypeError(f"weight must be a (C,) floating tensor of class weights, got {type(weight).__name__}")
        try:
            tensor = torch.tensor(np.asarray(weight, dtype=np.float64), dtype=torch.get_default_dtype())
        except (TypeError, ValueError) as exc:
            raise TypeError(f"weight must be a (C,) sequence of numbers: {exc}") from None
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got dtype {tensor.dtype}; cast it with weight.float()")
    if tensor.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), one entry per class, got {tuple(tensor.shape)}")
    if values and tensor.numel():
        w = tensor.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains NaN or infinite values")
        if bool((w < 0).any()):
            raise ValueError(f"weight must be >= 0, got a negative entry ({float(w.min()):.3g})")
    return tensor


# ---------------------------------------------------------------------- targets and row weights


def _batch_of_one(input: Tensor, target: Any) -> tuple[Tensor, Tensor]:
    """Unbatched ``(C,)`` input with a () class index or a (C,) distribution -> a batch of one."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    wanted = tuple(input.shape) if target.dtype.is_floating_point else ()
    if tuple(target.shape) != wanted:
        kind = "soft (floating) target must have input's shape" if wanted else "class-index target must be 0-d, shape"
        raise ValueError(f"unbatched input of shape {tuple(input.shape)}: a {kind} {wanted}, got {tuple(target.shape)}")
    return input.unsqueeze(0), target.unsqueeze(0)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _tree_kernel(tree: Tree, scale: float | None) -> np.ndarray:
    """The (C, C) float64 "tree" smoothing table of :func:`smoothing_distribution`, cached (read-only)."""

    def build() -> np.ndarray:
        d = tree.distance_matrix()
        tau = scale
        if tau is None:
            positive = d[d > 0]
            tau = float(positive.min()) if positive.size else 1.0
        k = np.exp(-(d / tau))  # d[y, y] = 0 is each row's minimum: entries in (0, 1], the sum >= 1
        k /= k.sum(axis=1, keepdims=True)
        k.setflags(write=False)
        return k

    return tree.cached(("smoothing", scale), build)


def _kernel_tensor(tree: Tree, scale: float | None, like: Tensor) -> Tensor:
    """The "tree" table on ``like``'s device in its compute dtype; cached per device and dtype, except while
    tracing (tensors made under torch.compile/export/func must not outlive the trace)."""
    dtype = _compute_dtype(like)
    table = _tree_kernel(tree, scale)
    if _inputs.tracing():
        return torch.as_tensor(table, dtype=dtype, device=like.device)
    return tree.cached(
        ("smoothing", scale, str(like.device), dtype), lambda: torch.tensor(table, dtype=dtype, device=like.device)
    )


def _smoothed_target(batch: _inputs.Batch, tree: Tree, eps: float, smoothing: str, scale: float | None) -> Tensor:
    """(M, C) ``(1 - eps) q + eps s`` in the compute dtype (see :func:`emd`). Ignored rows (class index
    ``ignore_index``) get class 0's smoothed target, a placeholder: their weight in the reduction is 0."""
    x = batch.x
    dtype = _compute_dtype(x)
    num_classes = x.shape[1]
    if batch.soft is not None:
        q = batch.soft.to(dtype)
        s = q @ _kernel_tensor(tree, scale, x) if smoothing == "tree" else torch.full_like(q, 1.0 / num_classes)
        return q * (1.0 - eps) + s * eps
    labels = batch.labels
    assert labels is not None  # exactly one of labels and soft is set (Batch)
    if batch.keep is not None:
        labels = torch.where(batch.keep, labels, 0)
    if smoothing == "tree":
        base = _kernel_tensor(tree, scale, x).index_select(0, labels) * eps
    else:
        base = torch.full((labels.shape[0], num_classes), eps / num_classes, dtype=dtype, device=x.device)
    return base.scatter_add(
        1, labels[:, None], torch.full((labels.shape[0], 1), 1.0 - eps, dtype=dtype, device=x.device)
    )


def _row_weights(batch: _inputs.Batch, weight: Tensor | None) -> tuple[Tensor | None, Tensor | int | None]:
    """Per-row weights ``r`` (M,) and the divisor of "mean" (None: ``batch.num_kept``), see :func:`emd`.

    Without class weights, smoothed class-index targets still need ``r`` = the mask of rows that count, since
    the backend then sees soft targets and computes every row."""
    if weight is None:
        return (None if batch.keep is None else batch.keep), None
    w = weight.to(_compute_dtype(batch.x))
    if batch.soft is not None:
        return batch.soft.to(w.dtype) @ w, batch.x.shape[0]
    labels = batch.labels
    assert labels is not None  # exactly one of labels and soft is set (Batch)
    if batch.keep is None:
        r = w.index_select(0, labels)
    else:
        r = w.index_select(0, torch.where(batch.keep, labels, 0)) * batch.keep
    return r, r.sum()


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
