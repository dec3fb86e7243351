"""Fused CPU backend ("numba"): each row's softmax, flows, loss and gradient in one kernel call.

The kernels live in :mod:`.numba_kernels` and are imported on first use (numba takes a second to import).
The gradient is computed in the forward pass, while each row is in cache, pre-scaled by the gradient the
reduction will send back (:attr:`~emdloss._inputs.Batch.row_weight`); backward then returns it as it is for a
plain ``loss.backward()`` and rescales it otherwise.

Runs CPU tensors outside ``torch.compile`` and ``torch.func`` tracing, when the target needs no gradient. Its
gradient is not differentiable: ``create_graph=True`` through it raises, naming ``backend="torch"``.
If numba or its kernels fail on this machine, it warns once and the registry uses the reference backend.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._inputs import Batch, tracing
from .._reduction import check_finite_loss
from ..tree import Tree
from .base import Backend, BackendUnusable, BackendWarning

#: The error of a fused backward asked for a differentiable gradient.
SECOND_DERIVATIVE_MESSAGE = (
    "emdloss: second derivatives (create_graph=True, Hessian-vector products, gradient penalties) need "
    "backend='torch'; the fused CPU backend computes its gradient in the forward pass and cannot differentiate it"
)


#: Up to this many rows, :func:`sum_rows` adds them with ``math.fsum`` (see there).
EXACT_SUM_MAX_ROWS = 1024


def sum_rows(loss: np.ndarray) -> float:
    """The sum of the (M,) per-row losses as a Python float: exact (``math.fsum``) for up to
    :data:`EXACT_SUM_MAX_ROWS` rows, numpy's pairwise float64 sum beyond. Both reduced paths (this backend's
    Function and :mod:`.fast_path`) sum through here, so they agree bit for bit. Why two ways: on small batches
    numpy's reduction set-up cost about 0.15x cross-entropy's forward and backward (128 x 10), where a Python
    list and ``fsum`` cost a few microseconds; on large ones the list would cost more than the kernel."""
    if loss.shape[0] <= EXACT_SUM_MAX_ROWS:
        try:
            return math.fsum(loss.tolist())
        except (ValueError, OverflowError):  # inf - inf (fsum raises where a float sum gives NaN): not from losses >= 0
            pass
    return float(loss.sum(dtype=np.float64))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FusedEMDFunction(torch.autograd.Function):
    """Rows ``x`` (M, C) -> per-row losses (M,) in ``x``'s dtype, or with ``reduced`` the loss after the batch's
    "mean"/"sum" (0-d); the gradient comes from the forward kernel."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, batch: Batch, tree: Tree, rho: float, kernels: ModuleType, reduced: bool = False
    ) -> Tensor:
        compute = _compute_dtype(x.dtype)
        xc = (x.detach() if x.dtype == compute else x.detach().to(compute)).contiguous().numpy()
        labels = batch.labels.numpy() if batch.labels is not None else None
        soft = batch.soft.detach().to(compute).contiguous().numpy() if batch.soft is not None else None
        ctx.row_weight = batch.row_weight
        ctx.reduced = reduced
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad = kernels.tree_rows(
            xc, labels, soft, tree, rho, batch.from_logits, need_grad, batch.ignore_index, ctx.row_weight
        )
        ctx.x_dtype = x.dtype
        if need_grad:
            ctx.save_for_backward(torch.from_numpy(grad))
        if reduced:  # the rows' sum (sum_rows), times 1 ("sum") or 1 / counted rows ("mean"), rounded once
            total = sum_rows(loss)
            if not math.isfinite(total):
                check_finite_loss(torch.from_numpy(loss), batch)  # raises when a bad label or logit is the cause
            return torch.tensor(total * ctx.row_weight, dtype=x.dtype)
        return torch.from_numpy(loss) if loss.dtype == xc.dtype == x.dtype else torch.from_numpy(loss).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        if torch.is_grad_enabled():  # create_graph=True: the caller will differentiate this gradient
            raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)
        (grad,) = ctx.saved_tensors
        if ctx.reduced:  # 0-d: the gradient was scaled by the reduction already
            factor = grad_out.item()
            gx = grad if factor == 1.0 else grad * factor
            return gx if gx.dtype == ctx.x_dtype else gx.to(ctx.x_dtype), None, None, None, None, None
        uniform = grad_out.numel() and (grad_out.stride(0) == 0 or bool(grad_out.amin() == grad_out.amax()))
        if uniform:  # one value for every row: "mean" and "sum" send this, expanded
            factor = grad_out.detach().as_strided((), ()).item() / ctx.row_weight  # its one value
            gx = grad if factor == 1.0 else grad * factor  # (autograd never writes into what backward returns)
        else:
            gx = grad * (grad_out.to(grad.dtype) / ctx.row_weight)[:, None]
        return gx if gx.dtype == ctx.x_dtype else gx.to(ctx.x_dtype), None, None, None, None, None


class FusedCPUBackend(Backend):
    """The fused numba kernels on CPU tensors (see the module docstring)."""

    name = "numba"

    def __init__(self) -> None:
        self._kernels: ModuleType | None = None
        self._broken: str | None = None

    def kernels(self) -> ModuleType | None:
        """:mod:`.numba_kernels`, imported on first use; None (after one warning) if it cannot be."""
        if self._kernels is None and self._broken is None:
            try:
                from . import numba_kernels
            except Exception as exc:  # a broken numba install must leave the reference path working
                self._give_up(f"numba cannot be imported ({type(exc).__name__}: {exc})")
            else:
                self._kernels = numba_kernels
        return self._kernels

    def usable_kernels(self) -> ModuleType | None:
        """:meth:`kernels` while the backend is usable here (None once they failed to import or compile)."""
        if self._kernels is None:
            self.kernels()
        return self._kernels if self._broken is None else None

    def _give_up(self, reason: str) -> None:
        self._broken = reason
        warnings.warn(f"emdloss: the fused CPU backend is unavailable: {reason}; using backend='torch'",
                      BackendWarning, stacklevel=4)  # fmt: skip

    def unavailable(self) -> str | None:
        self.kernels()
        return self._broken

    def cannot_run(self, batch: Batch) -> str | None:
        if batch.x.device.type != "cpu":
            return f"it runs CPU tensors only (input is on {batch.x.device})"
        if batch.soft is not None and batch.soft.requires_grad:
            return "it does not differentiate with respect to the target (the target requires grad)"
        if tracing():
            return "torch.compile and torch.func cannot trace through numba"
        if batch.row_weight is None:  # pragma: no cover - the count is an int on the CPU outside tracing
            return "the number of counted rows is unknown"
        return None

    def row_losses(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        return self._apply(batch, tree, rho, reduced=False)

    def loss(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        """Fuses "mean" and "sum" (over at least one counted row) into the kernel call: one autograd node,
        the rows summed by :func:`sum_rows`."""
        if batch.reduction == "none" or not batch.num_kept:
            return super().loss(batch, tree, rho)
        return self._apply(batch, tree, rho, reduced=True)

    def _apply(self, batch: Batch, tree: Tree, rho: float, reduced: bool) -> Tensor:
        kernels = self.kernels()
        if kernels is None:
            raise BackendUnusable(self._broken)
        try:
            apply: Callable[..., Tensor] = _FusedEMDFunction.apply  # torch leaves Function.apply untyped
            return apply(batch.x, batch, tree, rho, kernels, reduced)
        except kernels.KernelFailure as exc:
            self._give_up(f"its kernels fail to compile here ({exc})")
            raise BackendUnusable(self._broken) from exc
