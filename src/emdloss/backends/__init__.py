"""Backends compute tree EMD losses: :func:`choose_backend` picks one per call.

- :mod:`.torch_ops`: the reference closed form in torch ops, any device, any autograd use
  (:func:`.torch_ops.tree_emd_rows`: per-row losses, reduced by the caller).
- :mod:`.numba_cpu`: fused kernels on the CPU, the default there when numba imports
  (:func:`fused_tree_emd`: the reduced loss, from one kernel call).

The fused path is used for CPU tensors unless the target needs a gradient, torch is tracing
(``torch.compile``, ``torch.func``), or ``EMDLOSS_BACKEND=torch`` is set in the environment.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from .. import _checks
from ..tree import Tree

_numba_cpu = None  # imported on first use: numba takes a second to import and pulls in scipy


def numba_kernels():
    """The fused CPU module, imported on first use; None if numba cannot be imported."""
    global _numba_cpu
    if _numba_cpu is None:
        try:  # numba is a core dependency, but a broken install must still leave the reference path working
            from . import numba_cpu
        except ImportError:  # pragma: no cover
            _numba_cpu = False
        else:
            _numba_cpu = numba_cpu
    return _numba_cpu or None


BACKENDS = ("auto", "torch", "numba")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class FusedTreeEMDLoss(torch.autograd.Function):
    """The reduced tree-EMD loss of rows ``x`` (M, C) on the CPU, in one fused kernel call.

    The kernel checks the class indices, applies ``ignore_index``, and computes the gradient along with the
    loss (one more sweep of each row while it is in cache), already scaled for the reduction; the backward
    pass returns it as is when the incoming gradient is 1 (``loss.backward()``) and scales it otherwise.
    """

    @staticmethod
    def forward(ctx, x: Tensor, labels: Tensor | None, soft: Tensor | None, tree: Tree, rho: float,  # type: ignore[override]
                from_logits: bool, ignore_index: int, reduction: str, out_shape: tuple[int, ...], check_logits: bool,
                check_soft: bool) -> Tensor:
        compute = _compute_dtype(x.dtype)
        xc = (x.detach() if x.dtype == compute else x.detach().to(compute)).contiguous().numpy()
        y = labels.detach().numpy().astype(np.int64, copy=False) if labels is not None else None
        q = soft.detach().to(compute).contiguous().numpy() if soft is not None else None
        kernels = numba_kernels()
        kernels.follow_torch_threads()
        if q is not None and check_soft:
            _checks.check_distribution_stats("target", *kernels.distribution_stats(q), q.shape[1], soft.dtype)
        kept = xc.shape[0] if y is None else int(np.count_nonzero(y != ignore_index))
        scale = 1.0 / kept if reduction == "mean" and kept else 1.0
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad = kernels.tree_rows(xc, y, q, tree, rho, from_logits, need_grad, ignore_index, scale)
        total = float(loss.sum())
        if not math.isfinite(total):
            if y is not None:
                _checks.check_labels(y, tree.num_classes, ignore_index)
            if check_logits and not _checks.all_finite(x):
                raise ValueError("input contains NaN or infinite logits")
        ctx.reduction, ctx.x_dtype = reduction, x.dtype
        if need_grad:
            ctx.save_for_backward(torch.from_numpy(grad))
        if reduction == "none":
            return torch.from_numpy(loss).to(x.dtype).reshape(out_shape)
        value = total if reduction == "sum" else (total / kept if kept else math.nan)
        return torch.from_numpy(np.array(value)).to(x.dtype)  # (from_numpy: a third of torch.tensor's time)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            gx = grad * grad_out.reshape(-1, 1).to(grad.dtype)
        elif float(grad_out) != 1.0:
            gx = grad * grad_out.to(grad.dtype)
        else:
            gx = grad  # autograd does not write into incoming gradients; AccumulateGrad copies what it keeps
        return gx.to(ctx.x_dtype), None, None, None, None, None, None, None, None, None, None


def fused_tree_emd(rows: _checks.Rows, tree: Tree, rho: float, from_logits: bool, ignore_index: int, reduction: str) -> Tensor:
    """The loss of :class:`FusedTreeEMDLoss` for rows from ``_checks.to_rows(..., checked_by_kernel=True)``."""
    return FusedTreeEMDLoss.apply(
        rows.x, rows.hard, rows.soft, tree, rho, from_logits, ignore_index, reduction, rows.out_shape,
        rows.check_logits, rows.check_soft
    )


def choose_backend(x: Tensor, soft: Tensor | None, backend: str = "auto") -> str:
    """Which backend computes these rows: "numba" or "torch". ``soft`` is the target if it is a distribution."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("EMDLOSS_BACKEND", "auto")
    fused_ok = (
        numba_kernels() is not None
        and x.device.type == "cpu"
        and not (soft is not None and soft.requires_grad)
        and not _checks.tracing()
    )
    if backend == "numba":
        if not fused_ok:
            raise ValueError(
                "backend='numba' needs numba, CPU tensors, a target without gradient and no torch.compile/torch.func "
                "tracing; use backend='auto'"
            )
        return "numba"
    if backend == "torch":
        return "torch"
    return "numba" if fused_ok else "torch"

